"""A replica that is shutting down drains: it claims nothing more, lets the send already at the
homeserver finish and writes its outcome, gives every other claim back at once (free, due now),
and answers `/ready` with 503 from the first moment."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI

from tests.integration.common import enc, rows, schedule_message
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

# A bound on condition waits only, never a measured time: generous for a loaded machine.
WAIT_SECONDS = 30.0


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not await condition():
            await asyncio.sleep(0.01)
    assert await condition(), what


def _held_transport(
    homeserver: FakeHomeserver,
) -> tuple[httpx.MockTransport, asyncio.Event, asyncio.Event]:
    """The homeserver takes the first event PUT and holds its answer until the gate opens;
    `taken` is set once it has."""
    taken, gate = asyncio.Event(), asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        answer = homeserver.handle(request)
        if request.method == "PUT" and not taken.is_set():
            taken.set()
            await gate.wait()
        return answer

    return httpx.MockTransport(handler), taken, gate


def _by_body(stored: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {json.loads(row["content"])["body"]: row for row in stored}


async def test_a_draining_replica_finishes_its_send_and_gives_the_rest_back(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    transport, taken, gate = _held_transport(homeserver)
    async with app_and_client(
        database_url,
        clock,
        transport,
        replay_concurrency=1,
        claim_lease_seconds=60,
    ) as (app, client):
        replay = app.state.container.replay
        # One room's first event or the other room's takes the one request slot and is held at
        # the homeserver; the rest wait, claimed: behind it in its room, or for the slot.
        await schedule_message(client, 1000, txn="a1", room=enc("!a:test"))
        await schedule_message(client, 1000, txn="a2", room=enc("!a:test"))
        await schedule_message(client, 1000, txn="b1", room=enc("!b:test"))
        clock.advance(1000)
        run = asyncio.create_task(replay.run_due())
        await asyncio.wait_for(taken.wait(), WAIT_SECONDS)
        claimed = _by_body(await rows(app))
        assert all(row["claim_id"] is not None for row in claimed.values()), claimed
        (put,) = homeserver.replays()
        (held,) = [b for b, r in claimed.items() if put.url.path.endswith(r["delay_id"])]
        waiting = [b for b in claimed if b != held]
        # Due only now: the run is still going, but a draining replica claims nothing more.
        await schedule_message(client, 10, txn="late", room=enc("!b:test"))
        clock.advance(10)

        drain: Any = app.state.drain
        drain.start()
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["scheduler"] == "draining"

        async def given_back() -> bool:
            stored = _by_body(await rows(app))
            return all(stored[body]["claim_id"] is None for body in waiting)

        # Given back while the send at the homeserver is still held.
        await _until(given_back, "the claims not in flight were not given back")
        assert not gate.is_set()
        assert not run.done()
        now = clock.now_ms()
        stored = _by_body(await rows(app))
        for body in [*waiting, "late"]:
            assert stored[body]["status"] == "scheduled", stored[body]
            assert stored[body]["claim_id"] is None, stored[body]
            assert stored[body]["due_ts"] <= now, stored[body]  # due now: a peer takes it
        assert stored[held]["claim_id"] is not None  # still being sent

        gate.set()
        await asyncio.wait_for(drain.wait(), WAIT_SECONDS)
        assert run.done()
        stored = _by_body(await rows(app))
        assert stored[held]["status"] == "sent", stored[held]
        assert stored[held]["event_id"], stored[held]  # its outcome written
        for body in [*waiting, "late"]:
            assert stored[body]["status"] == "scheduled"
            assert stored[body]["claim_id"] is None
        sent = [r.url.raw_path.decode() for r in homeserver.replays()]
        assert len(sent) == 1
        assert sent[0].endswith("/msc4140." + stored[held]["delay_id"])

        # Still draining: a new run claims nothing.
        await replay.run_due()
        again = _by_body(await rows(app))
        assert all(again[b]["claim_id"] is None for b in [*waiting, "late"])
        assert len(homeserver.replays()) == 1
        assert (await client.get("/ready")).status_code == 503


async def test_ready_answers_503_from_the_first_moment_of_a_drain(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    scheduler = app.state.container.scheduler
    scheduler.start()
    try:
        assert (await client.get("/ready")).status_code == 200
        app.state.drain.start()  # nothing awaited in between
        r = await client.get("/ready")
        assert r.status_code == 503
        assert r.json() == {"database": "ok", "scheduler": "draining"}
        await asyncio.wait_for(app.state.drain.wait(), WAIT_SECONDS)
    finally:
        scheduler.shutdown()
