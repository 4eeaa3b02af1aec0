"""Lookups over large contents: a page stops at a size as well as a count (so one user's lookup
never holds the process up for long), pages still give every event once and in order, and each
event's stored content is spliced into the answer as it is, not parsed and rendered again."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app import repository_lookup as lookup_repo
from app.lookups import PAGE_BYTES
from app.models import delayed_event
from tests.integration.common import ALICE, UNSTABLE, V1, act, schedule_message
from tests.support.fakes import FakeClock

BIG = {"body": "x" * 60_000}  # a request body stays under the 64 KiB limit


async def page(
    client: httpx.AsyncClient, query: str, prefix: str = UNSTABLE
) -> tuple[dict[str, Any], int]:
    """A page of the msc4140 list (scheduled and finalised apart), or of `prefix`'s list."""
    r = await client.get(f"{prefix}/delayed_events?{query}", headers=ALICE)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body, len(r.content)


async def all_pages(
    client: httpx.AsyncClient, query: str, key: str, prefix: str = UNSTABLE
) -> tuple[list[str], list[tuple[int, int]]]:
    """Every delay_id of list `key` over all pages, and (items, bytes) of each page."""
    seen: list[str] = []
    sizes: list[tuple[int, int]] = []
    next_query = query
    for _ in range(100):
        body, size = await page(client, next_query, prefix)
        seen += [item["delay_id"] for item in body[key]]
        sizes.append((len(body[key]), size))
        if "next_batch" not in body:
            return seen, sizes
        next_query = f"{query}&from={body['next_batch']}"
    raise AssertionError("paging did not end")


def check_sizes(sizes: list[tuple[int, int]], item_bytes: int) -> None:
    """Every page but the last passed the budget by less than one item and holds at least one."""
    for items, size in sizes[:-1]:
        assert items >= 1
        assert PAGE_BYTES <= size < PAGE_BYTES + item_bytes + 1024, (items, size)


async def test_a_page_of_large_finalised_events_stops_at_the_size_budget(
    client: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for n in range(24):
        delay_id = await schedule_message(client, 60_000, txn=f"t{n}", content=BIG)
        assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
        ids.append(delay_id)
        clock.advance(1)
    loaded: list[int] = []
    list_finalised = lookup_repo.list_finalised

    async def counting(*args: Any, **kwargs: Any) -> lookup_repo.Page:
        result = await list_finalised(*args, **kwargs)
        loaded.append(len(result.events))
        return result

    monkeypatch.setattr(lookup_repo, "list_finalised", counting)
    first, size = await page(client, "status=finalised&limit=1000")
    # Each item carries its content twice (flat and under delayed_event): ~120 KB an item.
    assert 1 <= len(first["finalised"]) < 12
    assert PAGE_BYTES <= size < PAGE_BYTES + 2 * 130_000
    # What was read from the database is bounded by the page, not by the limit of 1,000.
    assert loaded[0] <= 2 * len(first["finalised"]) + 1
    seen, sizes = await all_pages(client, "status=finalised&limit=1000", "finalised")
    assert len(seen) == len(set(seen)) == 24
    assert seen == ids[::-1]  # newest first
    check_sizes(sizes, 2 * 130_000)


async def test_a_page_of_large_scheduled_events_stops_at_the_size_budget(
    client: httpx.AsyncClient,
) -> None:
    ids = [await schedule_message(client, 60_000 + n, txn=f"t{n}", content=BIG) for n in range(30)]
    seen, sizes = await all_pages(client, "status=scheduled&limit=1000", "scheduled")
    assert seen == ids
    assert len(sizes) >= 2
    check_sizes(sizes, 2 * 130_000)  # each shown twice: under scheduled and delayed_events


async def test_both_lists_share_the_budget_and_each_goes_on_where_it_stopped(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    scheduled = [
        await schedule_message(client, 60_000 + n, txn=f"s{n}", content=BIG) for n in range(20)
    ]
    finalised = []
    for n in range(12):
        delay_id = await schedule_message(client, 1000, txn=f"f{n}", content=BIG)
        assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
        finalised.append(delay_id)
        clock.advance(1)
    seen_s: list[str] = []
    seen_f: list[str] = []
    query = "limit=1000"
    for _ in range(100):
        body, size = await page(client, query)
        assert body["delayed_events"] == body["scheduled"]
        assert body["scheduled"] or body["finalised"]
        seen_s += [item["delay_id"] for item in body["scheduled"]]
        seen_f += [item["delay_id"] for item in body["finalised"]]
        if "next_batch" not in body:
            break
        assert size >= PAGE_BYTES
        query = f"limit=1000&from={body['next_batch']}"
    assert seen_s == scheduled
    assert seen_f == finalised[::-1]


async def test_stored_content_is_spliced_in_once_per_place_it_is_shown(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    """Content is stored as compact JSON and shown as stored: a number written `1e2` stays so
    (a parse and a second rendering would make it 100.0)."""
    scheduled = await schedule_message(client, 60_000, txn="s")
    finalised = await schedule_message(client, 60_000, txn="f")
    assert (await act(client, finalised, "cancel", headers=ALICE)).status_code == 200
    async with app.state.container.engine.begin() as conn:
        await conn.execute(
            delayed_event.update().values(content='{"marker":1e2}'),
        )
    r = await client.get(f"{V1}/delayed_events?status=finalised", headers=ALICE)
    assert r.text.count('{"marker":1e2}') == 2  # flat and under delayed_event
    [item] = r.json()["finalised"]
    assert item["content"] == item["delayed_event"]["content"] == {"marker": 100.0}
    r = await client.get(f"{V1}/delayed_events?status=scheduled", headers=ALICE)
    assert r.text.count('{"marker":1e2}') == 2  # under scheduled and delayed_events alike
    assert r.json()["scheduled"][0]["delay_id"] == scheduled
    r = await client.get(f"{V1}/delayed_events/{scheduled}", headers=ALICE)
    assert r.text.count('{"marker":1e2}') == 1
    assert r.headers["content-type"] == "application/json"


async def test_a_page_of_the_msc4486_lookup_stops_at_the_size_budget(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    ids = [await schedule_message(client, 60_000 + n, txn=f"s{n}", content=BIG) for n in range(20)]
    for n in range(10):
        delay_id = await schedule_message(client, 1000 + n, txn=f"f{n}", content=BIG)
        assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
        ids.insert(n, delay_id)  # sent earlier than every scheduled one: first by send time
        clock.advance(1)
    seen, sizes = await all_pages(client, "limit=1000", "delayed_events", prefix=V1)
    assert seen == ids  # every item once, by send time, finalised and scheduled together
    assert len(sizes) >= 3
    for items, size in sizes:
        # Each item is shown under two list names, a finalised one with its content twice.
        assert items >= 1
        assert size < PAGE_BYTES + 4 * 61_000, (items, size)
