"""Looking up delayed events: the list (filters, paging, both generations' field names), a single
event, and how long finalised history is kept."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    ALICE_PHONE,
    BOB,
    ROOM,
    UNSTABLE,
    V1,
    act,
    assert_error,
    get_event,
    run_due,
    schedule_b,
    schedule_message,
    schedule_state,
)
from tests.support.fakes import FakeClock, FakeHomeserver

PREFIXES = [UNSTABLE, V1]
SCHEDULED_FIELDS = {
    "delay_id",
    "room_id",
    "type",
    "content",
    "delay",
    "delay_ms",
    "running_since",
    "scheduled_at",
    "delayed_since_ts",
}


async def list_events(
    client: httpx.AsyncClient, prefix: str = V1, query: str = "", headers: dict[str, str] = ALICE
) -> dict[str, Any]:
    r = await client.get(f"{prefix}/delayed_events{query}", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_empty(client: httpx.AsyncClient, prefix: str) -> None:
    body = await list_events(client, prefix)
    assert body["delayed_events"] == []
    assert body["scheduled"] == []
    assert body["finalised"] == []
    assert "next_batch" not in body


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_only_own_events_by_send_time(
    client: httpx.AsyncClient, clock: FakeClock, prefix: str
) -> None:
    late = await schedule_message(client, 9000, txn="late")
    early = await schedule_message(client, 1000, txn="early")
    middle = await schedule_message(client, 5000, txn="middle", headers=ALICE_PHONE)
    await schedule_message(client, 3000, txn="bob", headers=BOB)
    body = await list_events(client, prefix)
    ids = [e["delay_id"] for e in body["delayed_events"]]
    assert ids == [early, middle, late]
    assert body["scheduled"] == body["delayed_events"]
    bob = await list_events(client, prefix, headers=BOB)
    assert len(bob["delayed_events"]) == 1
    assert bob["delayed_events"][0]["delay_id"] not in ids


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_list_requires_token(client: httpx.AsyncClient, prefix: str) -> None:
    assert_error(await client.get(f"{prefix}/delayed_events"), 401, "M_MISSING_TOKEN")
    r = await client.get(f"{prefix}/delayed_events", headers={"Authorization": "Bearer nobody"})
    assert_error(r, 401, "M_UNKNOWN_TOKEN")


async def test_item_fields(client: httpx.AsyncClient, clock: FakeClock) -> None:
    start = clock.now_ms()
    message = await schedule_message(client, 1500, content={"body": "ünï"})
    state = await schedule_state(client, 2500, key="@a:b/c", content={"k": [1, 2]})
    [m, s] = (await list_events(client))["delayed_events"]
    assert set(m) == SCHEDULED_FIELDS
    assert set(s) == SCHEDULED_FIELDS | {"state_key"}
    assert m == {
        "delay_id": message,
        "room_id": ROOM,
        "type": "m.room.message",
        "content": {"body": "ünï"},
        "delay": 1500,
        "delay_ms": 1500,
        "running_since": start,
        "scheduled_at": start,
        "delayed_since_ts": start,
    }
    assert s["delay_id"] == state
    assert s["state_key"] == "@a:b/c"
    assert s["type"] == "m.call.member"
    assert s["content"] == {"k": [1, 2]}
    assert s["delay"] == s["delay_ms"] == 2500
    # A single lookup shows the same item.
    assert await get_event(client, state) == s


async def test_gen_b_items_look_the_same(client: httpx.AsyncClient) -> None:
    r = await schedule_b(client, {"delay": 700, "state_key": "", "content": {"a": 1}})
    assert r.status_code == 200, r.text
    [item] = (await list_events(client))["delayed_events"]
    assert item["state_key"] == ""
    assert item["delay"] == item["delay_ms"] == 700


# Filters --------------------------------------------------------------------------------------


async def _one_of_each(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> dict[str, str]:
    """Events finalised in each of the four ways, plus one still scheduled."""
    ids = {
        "on_time": await schedule_message(client, 0, txn="on_time"),
        "by_action": await schedule_message(client, 5000, txn="by_action"),
        "cancelled": await schedule_message(client, 5000, txn="cancelled"),
        "refused": await schedule_message(client, 5000, txn="refused"),
        "scheduled": await schedule_message(client, 90_000, txn="scheduled"),
    }
    assert await run_due(app) == 1
    assert (await act(client, ids["by_action"], "send", headers=ALICE)).status_code == 200
    assert (await act(client, ids["cancelled"], "cancel", headers=ALICE)).status_code == 200
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    r = await act(client, ids["refused"], "send", headers=ALICE)
    assert r.status_code == 403
    # A refused send action keeps it scheduled; refused at its send time, it is finalised.
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    return ids


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_status_filter(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    ids = await _one_of_each(client, app, homeserver)
    clock.advance(5000)
    assert await run_due(app) == 1
    scheduled = await list_events(client, prefix, "?status=scheduled")
    assert [e["delay_id"] for e in scheduled["scheduled"]] == [ids["scheduled"]]
    assert scheduled["delayed_events"] == scheduled["scheduled"]
    assert "finalised" not in scheduled
    finalised = await list_events(client, prefix, "?status=finalised")
    assert "scheduled" not in finalised
    assert finalised["delayed_events"] == []
    assert {e["delay_id"] for e in finalised["finalised"]} == {
        ids["on_time"],
        ids["by_action"],
        ids["cancelled"],
        ids["refused"],
    }
    both = await list_events(client, prefix)
    assert both["scheduled"] == scheduled["scheduled"]
    if prefix == UNSTABLE:
        assert both["finalised"] == finalised["finalised"]
    else:  # MSC4486's list: finalised ones by send time too (tests/integration/test_history.py)
        by_id = sorted(finalised["finalised"], key=lambda e: str(e["delay_id"]))
        assert sorted(both["finalised"], key=lambda e: str(e["delay_id"])) == by_id


async def test_finalised_outcomes(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    ids = await _one_of_each(client, app, homeserver)
    clock.advance(5000)
    assert await run_due(app) == 1
    by_id = {
        e["delay_id"]: e
        for e in (await list_events(client, query="?status=finalised"))["finalised"]
    }
    expected = {
        "on_time": ("send", "delay"),
        "by_action": ("send", "action"),
        "cancelled": ("cancel", "action"),
        "refused": ("cancel", "error"),
    }
    for name, (outcome, reason) in expected.items():
        item = by_id[ids[name]]
        assert (item["outcome"], item["reason"]) == (outcome, reason), name
        nested = item["delayed_event"]
        assert set(nested) == SCHEDULED_FIELDS
        assert nested["delay_id"] == ids[name]
        assert {k: item[k] for k in SCHEDULED_FIELDS} == nested
        finalised = item["finalised"]
        assert finalised["finalised_ts"] == item["finalised_ts"]
        assert isinstance(item["finalised_ts"], int)
        for field in ("event_id", "error"):
            assert (field in finalised) == (field in item), (name, field)
            if field in item:
                assert finalised[field] == item[field]
        assert await get_event(client, ids[name]) == item
    sent = [m["event_id"] for m in homeserver.messages.values()]
    assert by_id[ids["on_time"]]["event_id"] in sent
    assert by_id[ids["by_action"]]["event_id"] in sent
    assert "event_id" not in by_id[ids["cancelled"]]
    assert "error" not in by_id[ids["cancelled"]]
    refused = by_id[ids["refused"]]
    assert refused["error"]["errcode"] == "M_FORBIDDEN"
    assert "event_id" not in refused
    assert by_id[ids["by_action"]]["finalised_ts"] == clock.now_ms() - 5000
    assert refused["finalised_ts"] == clock.now_ms()


async def test_delay_id_filter(client: httpx.AsyncClient, app: FastAPI) -> None:
    a = await schedule_message(client, 1000, txn="a")
    b = await schedule_message(client, 2000, txn="b")
    c = await schedule_message(client, 3000, txn="c")
    done = await schedule_message(client, 0, txn="d")
    bobs = await schedule_message(client, 1000, txn="e", headers=BOB)
    assert await run_due(app) == 1
    body = await list_events(client, query=f"?delay_id={c}&delay_id={a}&delay_id={bobs}")
    assert [e["delay_id"] for e in body["scheduled"]] == [a, c]
    assert body["finalised"] == []
    body = await list_events(client, query=f"?delay_id={done}&delay_id={b}")
    assert [e["delay_id"] for e in body["scheduled"]] == [b]
    assert [e["delay_id"] for e in body["finalised"]] == [done]


# Paging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_paging_scheduled(client: httpx.AsyncClient, prefix: str) -> None:
    ids = [await schedule_message(client, 1000 * (i + 1), txn=f"t{i}") for i in range(5)]
    seen: list[str] = []
    query = "?status=scheduled&limit=2"
    pages = 0
    while True:
        body = await list_events(client, prefix, query)
        pages += 1
        assert len(body["scheduled"]) <= 2
        seen += [e["delay_id"] for e in body["scheduled"]]
        if "next_batch" not in body:
            break
        query = f"?status=scheduled&limit=2&from={body['next_batch']}"
        assert pages < 10
    assert seen == ids
    assert pages == 3


async def test_paging_both_lists(client: httpx.AsyncClient, app: FastAPI, clock: FakeClock) -> None:
    """The msc4140 list pages its two lists side by side (v1 is MSC4486's single list)."""
    scheduled = [await schedule_message(client, 60_000 + i, txn=f"s{i}") for i in range(3)]
    finalised = []
    for i in range(5):
        delay_id = await schedule_message(client, 10, txn=f"f{i}")
        assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
        finalised.append(delay_id)
        clock.advance(1)
    seen_s: list[str] = []
    seen_f: list[str] = []
    query = "?limit=2"
    for _ in range(10):
        body = await list_events(client, UNSTABLE, query)
        seen_s += [e["delay_id"] for e in body["scheduled"]]
        seen_f += [e["delay_id"] for e in body["finalised"]]
        if "next_batch" not in body:
            break
        query = f"?limit=2&from={body['next_batch']}"
    assert seen_s == scheduled
    assert seen_f == finalised[::-1]  # newest first


async def test_paging_with_equal_send_times(client: httpx.AsyncClient) -> None:
    ids = {await schedule_message(client, 1000, txn=f"t{i}") for i in range(5)}
    seen: list[str] = []
    query = "?limit=1"
    for _ in range(10):
        body = await list_events(client, query=query)
        seen += [e["delay_id"] for e in body["scheduled"]]
        if "next_batch" not in body:
            break
        query = f"?limit=1&from={body['next_batch']}"
    assert sorted(seen) == sorted(ids)
    assert len(seen) == 5


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 200}])
async def test_default_page_size(client: httpx.AsyncClient) -> None:
    for i in range(101):
        r = await schedule_b(client, {"delay_ms": 1000 + i, "content": {}}, txn=f"t{i}")
        assert r.status_code == 200, r.text
    body = await list_events(client, query="?status=scheduled")
    assert len(body["scheduled"]) == 100
    rest = await list_events(client, query=f"?status=scheduled&from={body['next_batch']}")
    assert len(rest["scheduled"]) == 1
    assert "next_batch" not in rest
    big = await list_events(client, query="?status=scheduled&limit=1000")
    assert len(big["scheduled"]) == 101


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "query",
    [
        "?from=garbage!",
        "?from=abc",
        "?from=WzEsMl0",  # a JSON list, not a position
        "?from=eyJzIjoxfQ",  # {"s": 1}
        "?status=pending",
        "?status=",
        "?status=scheduled&status=finalised",
        "?limit=0",
        "?limit=1001",
        "?limit=-1",
        "?limit=ten",
        "?limit=1&limit=2",
    ],
)
async def test_invalid_query(client: httpx.AsyncClient, prefix: str, query: str) -> None:
    await schedule_message(client, 1000)
    r = await client.get(f"{prefix}/delayed_events{query}", headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")


# One event ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_get_one(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, prefix: str
) -> None:
    scheduled = await schedule_message(client, 1000, txn="a")
    sent = await schedule_message(client, 0, txn="b")
    assert await run_due(app) == 1
    r = await client.get(f"{prefix}/delayed_events/{scheduled}", headers=ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["delay_id"] == scheduled
    assert "finalised" not in r.json()
    r = await client.get(f"{prefix}/delayed_events/{sent}", headers=ALICE)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "send"
    assert r.json()["finalised"]["event_id"] == next(iter(homeserver.messages.values()))["event_id"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_get_one_errors(client: httpx.AsyncClient, prefix: str) -> None:
    delay_id = await schedule_message(client, 1000)
    assert_error(
        await client.get(f"{prefix}/delayed_events/{delay_id}", headers=BOB), 404, "M_NOT_FOUND"
    )
    assert_error(
        await client.get(f"{prefix}/delayed_events/unknown", headers=ALICE), 404, "M_NOT_FOUND"
    )
    assert_error(await client.get(f"{prefix}/delayed_events/{delay_id}"), 401, "M_MISSING_TOKEN")


# Retention ------------------------------------------------------------------------------------


async def _cancel_now(client: httpx.AsyncClient, txn: str, headers: dict[str, str]) -> str:
    delay_id = await schedule_message(client, 1000, txn=txn, headers=headers)
    assert (await act(client, delay_id, "cancel", headers=headers)).status_code == 200
    return delay_id


@pytest.mark.parametrize("settings_overrides", [{"finalised_max_per_user": 2}])
async def test_prune_keeps_newest_per_user(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    alice = []
    for i in range(4):
        alice.append(await _cancel_now(client, f"a{i}", ALICE))
        clock.advance(10)
    bob = await _cancel_now(client, "b", BOB)
    pending = await schedule_message(client, 5000, txn="pending")
    removed = await app.state.container.service.prune()
    assert removed == 2
    body = await list_events(client, UNSTABLE)
    assert [e["delay_id"] for e in body["finalised"]] == [alice[3], alice[2]]
    assert [e["delay_id"] for e in body["scheduled"]] == [pending]
    bobs = await list_events(client, UNSTABLE, headers=BOB)
    assert [e["delay_id"] for e in bobs["finalised"]] == [bob]


@pytest.mark.parametrize("settings_overrides", [{"finalised_retention_days": 1}])
async def test_prune_drops_old_history(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    old = await _cancel_now(client, "old", ALICE)
    pending = await schedule_message(client, 86_400_000, txn="pending")
    clock.advance(3_600_000)
    recent = await _cancel_now(client, "recent", ALICE)
    clock.advance(86_400_000 - 3_600_000)
    assert await app.state.container.service.prune() == 0  # exactly one day old is kept
    clock.advance(1)
    assert await app.state.container.service.prune() == 1
    body = await list_events(client)
    assert [e["delay_id"] for e in body["finalised"]] == [recent]
    assert [e["delay_id"] for e in body["scheduled"]] == [pending]
    r = await client.get(f"{V1}/delayed_events/{old}", headers=ALICE)
    assert_error(r, 404, "M_NOT_FOUND")


async def test_default_retention(client: httpx.AsyncClient, app: FastAPI, clock: FakeClock) -> None:
    delay_id = await _cancel_now(client, "x", ALICE)
    clock.advance(7 * 86_400_000)
    assert await app.state.container.service.prune() == 0
    clock.advance(1)
    assert await app.state.container.service.prune() == 1
    r = await client.get(f"{V1}/delayed_events/{delay_id}", headers=ALICE)
    assert_error(r, 404, "M_NOT_FOUND")
