"""The database says which replica is alive: each holds an advisory lock, and its claims name it.
A replica that is gone (its session ended, or was ended by the server) leaves claims another
replica takes over at once, not at the end of their lease; a replica that lost its lock sends
nothing more under its old claims, so two live replicas never both send a row."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app.crypto import new_key
from app.liveness import LOCK_CLASS
from tests.integration.common import ALICE, enc, get_event, rows, schedule_message, state_path
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver


def _replay(app: FastAPI) -> Any:
    return app.state.container.replay


async def _stop_session(app: FastAPI) -> None:
    """The replica's process is gone: its database session ends, and its lock with it."""
    await _replay(app).liveness.stop()


async def _end_session_from_the_server(app: FastAPI) -> None:
    """The server ends the session holding the lock (a restart, a network blip); the replica
    itself lives on and has not noticed yet."""
    key = _replay(app).liveness.key
    async with app.state.container.engine.connect() as conn:
        ended = await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND classid = :c AND objid = :k AND objsubid = 2"
            ),
            {"c": LOCK_CLASS, "k": key},
        )
        assert ended.scalars().all() == [True]
    # The server has really ended it once no session holds the lock any more.
    async with app.state.container.engine.connect() as conn:
        for _ in range(500):
            held = await conn.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = :k"),
                {"k": key},
            )
            if held.scalar_one() == 0:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the lock's session did not end")


@pytest.mark.parametrize("gone", [_stop_session, _end_session_from_the_server])
async def test_a_gone_replicas_claims_are_taken_over_at_once_and_sent_once(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    gone: Callable[[FastAPI], Awaitable[None]],
) -> None:
    """Replica A claims a room's message and state event and is gone while the homeserver holds
    the message's send. Replica B takes both over with no time passing (no lease runs out) and
    sends them. When A's held send comes back, A sends nothing more: its state event's claim
    fails the check before its request. The message, repeated, carries the same transaction id;
    the state event is put once."""
    in_gate = asyncio.Event()
    gate = asyncio.Event()

    async def held(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not gate.is_set():
            in_gate.set()
            await gate.wait()
        return homeserver.handle(request)

    async def direct(request: httpx.Request) -> httpx.Response:
        return homeserver.handle(request)

    key = new_key()  # the replicas share the key of the tokens at rest
    async with (
        app_and_client(database_url, clock, httpx.MockTransport(held), token_keys=key) as (
            a,
            client,
        ),
        app_and_client(database_url, clock, httpx.MockTransport(direct), token_keys=key) as (b, _),
    ):
        for app in (a, b):
            assert await _replay(app).liveness.acquire()
        try:
            message = await schedule_message(client, 1000)
            r = await client.put(
                state_path(enc("@alice:test_ALICEDEV")) + "?org.matrix.msc4140.delay=1001",
                json={"leave": True},
                headers=ALICE,
            )
            state = r.json()["delay_id"]
            clock.advance(1001)
            a_run = asyncio.create_task(_replay(a).run_due())
            await in_gate.wait()
            claims = {row["delay_id"]: row["claim_id"] for row in await rows(a)}
            key = str(_replay(a).liveness.key)
            assert {claim.split(".")[0] for claim in claims.values()} == {key}

            await gone(a)
            # B's run takes both over at once: no time has passed.
            assert await _replay(b).run_due() == 2
            for delay_id in (message, state):
                assert (await get_event(client, delay_id))["outcome"] == "send"

            gate.set()
            assert await a_run == 2
        finally:
            gate.set()
            for app in (a, b):
                await _replay(app).liveness.stop()
    puts = Counter(r.url.raw_path.decode().partition("?")[0] for r in homeserver.replays())
    assert sorted(puts.values()) == [1, 2]  # the message, repeated; the state event, once
    assert len(homeserver.messages) == 1
    (state_put,) = [path for path in puts if "/state/" in path]
    assert puts[state_put] == 1


async def test_claims_naming_no_lock_keep_their_lease(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """A claim of a replica that holds no lock (one of an older version, during a rolling
    upgrade), and the claim an event keeps while its timed-out send waits to be retried, are
    freed only when their time comes."""
    await schedule_message(client, 1000, txn="old")
    # In another room: the claim of the older replica holds its room until it is done.
    retried = await schedule_message(client, 1000, txn="doubt", room=enc("!other:test"))
    replay = _replay(app)
    clock.advance(1000)
    async with app.state.container.engine.begin() as conn:
        claimed = await due_repo.claim_due(conn, clock.now_ms(), replay.lease_ms, 10)
        (doubt,) = [e for e in claimed if e.delay_id == retried]
        await claims_repo.retry_later(
            conn, doubt, due_ts=clock.now_ms() + 5000, first_failure_ts=0, in_doubt=True
        )
    assert await replay.free_dead_claims() == 0
    assert await replay.run_due() == 0
    clock.advance(5000)
    assert await replay.run_due() == 1


async def test_a_replica_that_lost_its_lock_takes_a_new_key(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """After its lock's session ends, the replica's check notices, and the new lock it takes
    has a new key: claims under the old one count as a gone replica's."""
    liveness = _replay(app).liveness
    try:
        assert await liveness.acquire()
        assert await liveness.check()
        old = liveness.key
        await schedule_message(client, 1000)
        clock.advance(1000)
        async with app.state.container.engine.begin() as conn:
            (claimed,) = await due_repo.claim_due(conn, clock.now_ms(), 60_000, 10, old)
        await _end_session_from_the_server(app)
        assert not await liveness.check()
        assert liveness.key is None
        assert await liveness.acquire()
        assert liveness.key not in (None, old)
        async with app.state.container.engine.begin() as conn:
            assert not await claims_repo.recheck_claim(conn, claimed, clock.now_ms() + 60_000)
        assert await _replay(app).free_dead_claims() == 1
    finally:
        await liveness.stop()
