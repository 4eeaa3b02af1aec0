"""Two replicas on one database never split a room's due events between their claims: a claim
takes a room's due events only as a prefix of what the room has pending, so the replica sending
the earlier ones is the only one that may send the later ones until those are done. A room's
events therefore reach the homeserver in send order whichever replica sends them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app.crypto import new_key
from app.liveness import LOCK_CLASS
from app.models import DelayedEvent
from app.replay.wakeup import RETRY_PASSED_OVER_MS
from tests.integration.common import enc, schedule_message
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

LEASE = 30_000
ROOM_X = "!x:test"
ROOM_Y = "!y:test"
A = 41_401
B = 41_402


@asynccontextmanager
async def _replica(engine: AsyncEngine, key: int) -> AsyncIterator[int]:
    """A replica holding its lock under `key` (its claims name it) for the block."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_advisory_lock(:c, :k)"), {"c": LOCK_CLASS, "k": key})
        await conn.commit()
        try:
            yield key
        finally:
            await conn.execute(
                text("SELECT pg_advisory_unlock(:c, :k)"), {"c": LOCK_CLASS, "k": key}
            )
            await conn.commit()


async def _schedule(client: httpx.AsyncClient, room: str, count: int, first: int) -> list[str]:
    """`count` messages in `room`, one a second apart from `first` ms on."""
    return [
        await schedule_message(client, first + 1000 * n, txn=f"{room}-{n}", room=enc(room))
        for n in range(count)
    ]


def _ids(events: list[DelayedEvent]) -> list[str]:
    return [e.delay_id for e in events]


async def _claim(
    engine: AsyncEngine, clock: FakeClock, limit: int, holder: int | None
) -> list[DelayedEvent]:
    async with engine.begin() as conn:
        return await due_repo.claim_due(conn, clock.now_ms(), LEASE, limit, holder)


async def test_a_claim_takes_no_later_event_of_a_room_another_claim_holds_earlier_ones_of(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Replica A's claim is cut off by its limit in the middle of room X; replica B's claim
    right after takes room Y's event, not X's later ones, which A would be sending meanwhile."""
    x = await _schedule(client, ROOM_X, 4, 1000)
    y = await _schedule(client, ROOM_Y, 1, 9000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        assert _ids(await _claim(engine, clock, 2, A)) == x[:2]
        assert _ids(await _claim(engine, clock, 10, B)) == y
        # Replica A itself takes the rest of X: its room queue sends them after the first two.
        assert _ids(await _claim(engine, clock, 10, A)) == x[2:]


async def test_a_claim_being_made_keeps_its_rooms_later_events_from_another(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Replica A's claim of X's first two events is not committed yet when replica B claims: B
    skips the rows A has locked, and must not take X's later ones past them."""
    x = await _schedule(client, ROOM_X, 4, 1000)
    y = await _schedule(client, ROOM_Y, 1, 9000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        async with engine.connect() as conn_a:
            await conn_a.begin()
            held = await due_repo.claim_due(conn_a, clock.now_ms(), LEASE, 2, A)
            assert _ids(held) == x[:2]
            assert _ids(await _claim(engine, clock, 10, B)) == y
            await conn_a.commit()
        assert _ids(await _claim(engine, clock, 10, B)) == []


async def _finalise(engine: AsyncEngine, clock: FakeClock, events: list[DelayedEvent]) -> None:
    async with engine.begin() as conn:
        for event in events:
            assert await claims_repo.finalise(
                conn, event, status="sent", reason="delay", now=clock.now_ms(), event_id="$e"
            )


async def test_the_rest_of_a_room_is_claimable_once_the_earlier_claim_is_done(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    x = await _schedule(client, ROOM_X, 4, 1000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        first = await _claim(engine, clock, 2, A)
        assert _ids(await _claim(engine, clock, 10, B)) == []
        await _finalise(engine, clock, first[:1])
        assert _ids(await _claim(engine, clock, 10, B)) == []
        await _finalise(engine, clock, first[1:])
        assert _ids(await _claim(engine, clock, 10, B)) == x[2:]


async def _next_due(engine: AsyncEngine, clock: FakeClock, holder: int | None) -> int | None:
    async with engine.connect() as conn:
        return await due_repo.next_due(conn, clock.now_ms(), holder)


async def test_the_next_wake_up_is_not_for_events_held_back_behind_another_claim(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Room X's later events are due but held back for replica B: B's next wake-up is when A's
    lease would run out, not now (it would claim nothing and wake again at once). For A, which
    may take them, they are due now."""
    await _schedule(client, ROOM_X, 4, 1000)
    clock.advance(20_000)
    now = clock.now_ms()
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        await _claim(engine, clock, 2, A)
        assert await _next_due(engine, clock, B) == now + LEASE
        assert await _next_due(engine, clock, None) == now + LEASE
        assert await _next_due(engine, clock, A) == now - 20_000 + 3000


async def test_an_event_waiting_for_a_retry_does_not_hold_its_room_back(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The homeserver answered X's first event with a transient failure (or did not answer in
    time): it is retried later, and X's later events go meanwhile, as within one replica."""
    x = await _schedule(client, ROOM_X, 3, 1000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        (first,) = await _claim(engine, clock, 1, A)
        async with engine.begin() as conn:
            assert await claims_repo.retry_later(
                conn,
                first,
                due_ts=clock.now_ms() + 5000,
                first_failure_ts=clock.now_ms(),
                in_doubt=True,
            )
        assert _ids(await _claim(engine, clock, 1, B)) == x[1:2]
        assert _ids(await _claim(engine, clock, 10, A)) == []
        clock.advance(5000)
        # The retry is due, but replica B is sending X's second event: a room's events go out
        # from one replica at a time, so the retry is B's to take, in order with X's third.
        assert _ids(await _claim(engine, clock, 10, A)) == []
        assert _ids(await _claim(engine, clock, 10, B)) == [x[0], x[2]]


async def test_a_lapsed_claim_is_taken_over_with_the_rest_of_its_room(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    x = await _schedule(client, ROOM_X, 4, 1000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), _replica(engine, B):
        await _claim(engine, clock, 2, A)
        clock.advance(LEASE + 1)
        assert _ids(await _claim(engine, clock, 10, B)) == x


async def test_an_unnamed_claim_holds_its_room_back_from_every_other(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Claims made without a replica lock cannot be told apart: each holds the room back from
    any other claim, its maker's next one too."""
    x = await _schedule(client, ROOM_X, 3, 1000)
    clock.advance(20_000)
    engine = app.state.container.engine
    first = await _claim(engine, clock, 1, None)
    assert _ids(first) == x[:1]
    assert _ids(await _claim(engine, clock, 10, None)) == []
    await _finalise(engine, clock, first)
    assert _ids(await _claim(engine, clock, 10, None)) == x[1:]


def _replay(app: FastAPI) -> Any:
    return app.state.container.replay


async def test_two_replicas_send_a_rooms_messages_in_send_order(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """Replica A claims two of room X's four messages (its bound) and the homeserver holds the
    first one's send. Replica B, running meanwhile, sends nothing of X. Once the homeserver
    answers, A sends the rest, and X's messages land in the order they were written."""
    in_gate = asyncio.Event()
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not gate.is_set():
            in_gate.set()
            await gate.wait()
        return homeserver.handle(request)

    key = new_key()  # the replicas share the key of the tokens at rest
    async with (
        app_and_client(
            database_url, clock, httpx.MockTransport(held), token_keys=key, replay_max_claimed=2
        ) as (a, client),
        app_and_client(database_url, clock, homeserver.transport(), token_keys=key) as (b, _),
    ):
        for app in (a, b):
            assert await _replay(app).liveness.acquire()
        try:
            await _schedule(client, ROOM_X, 4, 1000)
            clock.advance(5000)
            a_run = asyncio.create_task(_replay(a).run_due())
            await in_gate.wait()
            assert await _replay(b).run_due() == 0
            gate.set()
            assert await a_run == 4
        finally:
            gate.set()
            for app in (a, b):
                await _replay(app).liveness.stop()
    bodies = [json.loads(r.content)["body"] for r in homeserver.replays()]
    assert bodies == [f"{ROOM_X}-{n}" for n in range(4)]


async def test_a_room_whose_first_due_event_is_locked_does_not_keep_other_rooms_out_of_a_claim(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Another transaction holds room X's first due row (a restart, a cancel, another claim on
    its way); X's later due rows are more than the claim's limit. They are passed over, and
    must not use the limit up: room Y's due event is claimed."""
    x = await _schedule(client, ROOM_X, 5, 1000)
    y = await _schedule(client, ROOM_Y, 1, 9000)
    clock.advance(20_000)
    engine = app.state.container.engine
    async with _replica(engine, A), engine.connect() as locker:
        await locker.execute(
            text("SELECT 1 FROM delayed_event WHERE delay_id = :d FOR UPDATE"), {"d": x[0]}
        )
        assert _ids(await _claim(engine, clock, 3, A)) == y
        await locker.rollback()
    # Once the lock is gone, X's events are claimed in order.
    async with _replica(engine, A):
        assert _ids(await _claim(engine, clock, 10, A)) == x


async def test_a_tick_that_can_claim_nothing_due_waits_before_trying_again(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """Room X's only due event is locked by another transaction: the run claims nothing, and
    the next due time is still "now". The wake-up is set a pause ahead, not at once (a loop
    for as long as the lock is held)."""
    x = await _schedule(client, ROOM_X, 1, 1000)
    clock.advance(5000)
    container = app.state.container
    async with container.engine.connect() as locker:
        await locker.execute(
            text("SELECT 1 FROM delayed_event WHERE delay_id = :d FOR UPDATE"), {"d": x[0]}
        )
        await container.scheduler.tick()
        await locker.rollback()
    assert container.scheduler.wake_at == clock.now_ms() + RETRY_PASSED_OVER_MS


async def test_a_run_with_rooms_busy_waits_before_claiming_a_passed_over_room_again(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """The run sends room Y's event (held at the homeserver) while room X's due event is locked
    by another transaction: the run sets its own wake-up a pause ahead, not at once."""
    in_gate = asyncio.Event()
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not gate.is_set():
            in_gate.set()
            await gate.wait()
        return homeserver.handle(request)

    async with app_and_client(database_url, clock, httpx.MockTransport(held)) as (app, client):
        x = await _schedule(client, ROOM_X, 1, 1000)
        await _schedule(client, ROOM_Y, 1, 2000)
        clock.advance(5000)
        container = app.state.container
        runner = container.replay
        looked_up = asyncio.Event()
        next_due = runner.next_due

        async def noted_next_due() -> int | None:
            # The run sets its wake-up in the same step as this returns.
            try:
                return await next_due()
            finally:
                looked_up.set()

        runner.next_due = noted_next_due
        async with container.engine.connect() as locker:
            await locker.execute(
                text("SELECT 1 FROM delayed_event WHERE delay_id = :d FOR UPDATE"), {"d": x[0]}
            )
            tick = asyncio.create_task(container.scheduler.tick())
            try:
                await in_gate.wait()
                await looked_up.wait()
                assert container.scheduler.wake_at == clock.now_ms() + RETRY_PASSED_OVER_MS
            finally:
                gate.set()
                await locker.rollback()
                await tick
