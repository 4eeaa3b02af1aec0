"""A replica that dies after the homeserver took an event, before writing the outcome, leaves a
claim whose lease runs out. What happened to the event is then unknown until another replay asks
the homeserver (which answers a repeated transaction with the first event): until then it counts
as being sent, so a restart or cancel must not be told it took effect. The same holds for an
event whose send timed out (the homeserver may have it) and for one the homeserver took whose
outcome is still being written: neither is listed as scheduled."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from tests.integration.common import (
    ALICE,
    UNSTABLE,
    V1,
    act,
    get_event,
    rows,
    run_due,
    schedule_message,
)
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver


def hold_outcome_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold the writes of sent outcomes back: the first event is set once a write is waiting,
    the second lets every write go on."""
    writing = asyncio.Event()
    release = asyncio.Event()
    write = claims_repo.finalise_sent_many

    async def held_back(conn: Any, outcomes: list[claims_repo.SentOutcome]) -> set[str]:
        writing.set()
        await release.wait()
        return await write(conn, outcomes)

    monkeypatch.setattr(claims_repo, "finalise_sent_many", held_back)
    return writing, release


async def _claim_and_die(app: FastAPI, clock: FakeClock) -> None:
    """What a replica does before it is killed mid-replay: claim, send, and record nothing."""
    container = app.state.container
    lease_ms = int(container.settings.claim_lease_seconds * 1000)
    async with container.engine.begin() as conn:
        claimed = await due_repo.claim_due(conn, clock.now_ms(), lease_ms, 10)
    assert len(claimed) == 1
    clock.advance(lease_ms + 1)


@pytest.mark.parametrize(
    ("prefix", "action", "status"),
    [
        (UNSTABLE, "restart", 404),
        (UNSTABLE, "cancel", 404),
        (V1, "restart", 409),
        (V1, "cancel", 409),
    ],
)
async def test_an_action_after_a_lapsed_claim_does_not_take_effect(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    action: str,
    status: int,
) -> None:
    delay_id = await schedule_message(client, 1000)
    clock.advance(1000)
    await _claim_and_die(app, clock)
    r = await act(client, delay_id, action, prefix=prefix, headers=ALICE)
    assert r.status_code == status, r.text
    # The next replay settles it: sent, once.
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1
    item = await get_event(client, delay_id)
    assert item["outcome"] == "send"


@pytest.mark.parametrize(
    ("prefix", "action", "status"),
    [
        (UNSTABLE, "restart", 404),
        (UNSTABLE, "cancel", 404),
        (V1, "restart", 409),
        (V1, "cancel", 409),
    ],
)
async def test_an_event_whose_send_timed_out_counts_as_being_sent_until_a_retry_settles_it(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    action: str,
    status: int,
) -> None:
    """The homeserver takes the event but its answer never comes (a read timeout): while the
    retry waits, the event may be in the room, so it is not listed as scheduled, and a cancel
    or restart is answered as for an event being sent. The retry, with the same transaction
    id, settles it: sent, once."""
    timeouts = [httpx.ReadTimeout("no answer")]

    async def stores_then_times_out(request: httpx.Request) -> httpx.Response:
        answer = homeserver.handle(request)
        if request.method == "PUT" and timeouts:
            raise timeouts.pop()
        return answer

    transport = httpx.MockTransport(stores_then_times_out)
    async with app_and_client(database_url, clock, transport) as (app, client):
        delay_id = await schedule_message(client, 1000)
        clock.advance(1000)
        assert await run_due(app) == 1
        assert len(homeserver.messages) == 1  # taken, though the sidecar could not tell
        listed = await client.get(f"{UNSTABLE}/delayed_events", headers=ALICE)
        assert listed.json()["delayed_events"] == []
        r = await act(client, delay_id, action, prefix=prefix, headers=ALICE)
        assert r.status_code == status, r.text
        (row,) = await rows(app)
        assert row["status"] == "scheduled"
        clock.advance(row["due_ts"] - clock.now_ms())
        assert await run_due(app) == 1
        item = await get_event(client, delay_id)
    assert item["outcome"] == "send"
    assert len(homeserver.messages) == 1
    assert len(homeserver.replays()) == 2


async def test_an_event_the_homeserver_took_is_not_listed_while_its_outcome_is_written(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Outcomes of sent events are written in the background. While one is held back, the event
    (already in the room) is not listed as scheduled, and a restart or cancel of it is answered
    as for a sent event."""
    delay_id = await schedule_message(client, 1000)
    other = await schedule_message(client, 60_000, txn="later")
    writing, release = hold_outcome_writes(monkeypatch)
    clock.advance(1000)
    run = asyncio.create_task(run_due(app))
    await writing.wait()
    assert len(homeserver.messages) == 1
    for query in ("", "?status=scheduled"):
        for prefix in (UNSTABLE, V1):
            listed = await client.get(f"{prefix}/delayed_events{query}", headers=ALICE)
            assert [e["delay_id"] for e in listed.json()["delayed_events"]] == [other]
    for prefix, status in ((UNSTABLE, 404), (V1, 409)):
        for action in ("restart", "cancel"):
            r = await act(client, delay_id, action, prefix=prefix, headers=ALICE)
            assert r.status_code == status, r.text
    release.set()
    assert await run == 1
    assert (await get_event(client, delay_id))["outcome"] == "send"
    assert len(homeserver.messages) == 1


async def test_the_single_lookup_of_an_event_being_written_shows_it_sent(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The homeserver took the event and its outcome write is held back: a lookup of that one
    event waits for the write (it is this replica's own send) and shows it sent, never as
    scheduled."""
    delay_id = await schedule_message(client, 1000)
    writing, release = hold_outcome_writes(monkeypatch)
    replay = app.state.container.replay
    settling = asyncio.Event()
    settle = replay.settle

    async def noted(delay_id: str, timeout: float) -> None:
        settling.set()
        await settle(delay_id, timeout)

    monkeypatch.setattr(replay, "settle", noted)
    clock.advance(1000)
    run = asyncio.create_task(run_due(app))
    await writing.wait()
    lookup = asyncio.create_task(get_event(client, delay_id))
    await asyncio.wait_for(settling.wait(), 30)  # the lookup found the event claimed
    assert not lookup.done()
    release.set()
    event = await lookup
    assert event["outcome"] == "send"
    assert event["finalised"]["event_id"] == next(iter(homeserver.messages.values()))["event_id"]
    assert await run == 1
