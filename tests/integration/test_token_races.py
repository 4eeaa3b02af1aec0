"""A device's stored token is never dropped while one of its events may still need it: neither by
a concurrent finalise in the database (a schedule of the same device committing at the same
time), nor by a run of the replay (an event of the device handled while a claim commits)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import repository as repo
from app import repository_claims as claims_repo
from app import repository_tokens as tokens_repo
from app.crypto import TokenCipher
from app.replay import Credentials, ReplayEngine, ReplayRunner, WakeUp
from tests.integration.common import (
    ALICE,
    UNSTABLE,
    bearer,
    get_event,
    rows,
    schedule_message,
)
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver


async def tokens(app: FastAPI) -> list[tuple[str, str]]:
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(text("SELECT user_id, device_id FROM device_token"))
        return [(row.user_id, row.device_id) for row in result]


async def wait_until_blocked(app: FastAPI, pids: set[int]) -> None:
    """Wait until one of the backends `pids` waits for a lock (read from PostgreSQL itself)."""
    async with app.state.container.engine.connect() as conn:
        while True:
            result = await conn.execute(
                text("SELECT pid FROM pg_locks WHERE NOT granted AND pid = ANY(:pids)"),
                {"pids": list(pids)},
            )
            if result.first() is not None:
                return
            await asyncio.sleep(0.005)


async def test_a_cancel_does_not_drop_the_token_a_concurrent_schedule_of_the_device_uses(
    app: FastAPI,
    client: httpx.AsyncClient,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The schedule holds its transaction open after storing its token; the cancel of the
    device's last event meanwhile must wait for it, and then leave the token the new event
    needs."""
    last = await schedule_message(client, 60_000, txn="old")
    stored_token = asyncio.Event()
    commit = asyncio.Event()
    store = tokens_repo.store_token

    async def store_then_hold(conn: AsyncConnection, *args: Any, **kwargs: Any) -> None:
        await store(conn, *args, **kwargs)
        stored_token.set()
        await commit.wait()

    backends: set[int] = set()
    cancel_started = asyncio.Event()
    cancel = repo.cancel

    async def cancel_noting_backend(conn: AsyncConnection, *args: Any) -> bool:
        backends.add((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        cancel_started.set()
        return await cancel(conn, *args)

    monkeypatch.setattr(tokens_repo, "store_token", store_then_hold)
    monkeypatch.setattr(repo, "cancel", cancel_noting_backend)
    scheduling = asyncio.create_task(schedule_message(client, 1000, txn="new"))
    await stored_token.wait()
    cancelling = asyncio.create_task(
        client.post(f"{UNSTABLE}/delayed_events/{last}/cancel", json={}, headers=ALICE)
    )
    await cancel_started.wait()
    blocked = asyncio.create_task(wait_until_blocked(app, backends))
    await asyncio.wait({blocked, cancelling}, return_when=asyncio.FIRST_COMPLETED)
    assert blocked.done()
    assert not cancelling.done(), "the cancel did not wait for the schedule"
    commit.set()
    new = await scheduling
    assert (await cancelling).status_code == 200
    assert await tokens(app) == [("@alice:test", "ALICEDEV")]

    clock.advance(1000)
    assert await app.state.container.replay.run_due() == 1
    [replay] = homeserver.replays()
    assert bearer(replay) == "alice_token"
    assert (await get_event(client, new))["outcome"] == "send"
    assert await tokens(app) == []


class HeldCommits:
    """An engine whose transactions can be held just before they commit, or announce that they
    have committed: `before_commit[conn]` is awaited before the transaction of `conn` commits,
    `after_commit[conn]` called once it has."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.before_commit: dict[AsyncConnection, Callable[[], Awaitable[None]]] = {}
        self.after_commit: dict[AsyncConnection, Callable[[], None]] = {}

    def connect(self) -> Any:
        return self._engine.connect()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.begin() as conn:
            yield conn
            held = self.before_commit.pop(conn, None)
            if held is not None:
                await held()
        done = self.after_commit.pop(conn, None)
        if done is not None:
            done()


async def test_a_claim_keeps_the_token_it_loaded_when_an_event_of_the_device_is_handled_meanwhile(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Event A of a device is being sent when B, of the same device, falls due; the run claims B
    and loads the device's token, and A's outcome is written while that claim commits. B must
    still go out with the token."""
    a_arrived = asyncio.Event()
    release_a = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not a_arrived.is_set():
            a_arrived.set()
            await release_a.wait()
        return homeserver.handle(request)

    async with app_and_client(database_url, clock, httpx.MockTransport(handler)) as (app, client):
        first = await schedule_message(client, 1000, txn="a")
        second = await schedule_message(client, 2000, txn="b")
        container = app.state.container
        engine = HeldCommits(container.engine)
        held = cast(AsyncEngine, engine)
        settings = container.settings
        wakeup = WakeUp()
        replay = ReplayRunner(
            held,
            ReplayEngine(held, container.replay_homeserver, clock, settings, wakeup),
            Credentials(held, TokenCipher(settings.token_keys), settings),
            clock,
            settings,
            wakeup,
            None,
        )
        clock.advance(1000)
        run = asyncio.create_task(replay.run_due())
        await a_arrived.wait()

        claim_waits = asyncio.Event()
        a_written = asyncio.Event()
        load = tokens_repo.load_tokens
        write = claims_repo.finalise_sent_many

        async def hold_claim_commit() -> None:
            claim_waits.set()
            await a_written.wait()

        async def load_then_hold(conn: AsyncConnection, devices: Any) -> Any:
            engine.before_commit[conn] = hold_claim_commit
            return await load(conn, devices)

        async def write_then_tell(conn: AsyncConnection, outcomes: Any) -> set[str]:
            engine.after_commit[conn] = a_written.set
            return await write(conn, outcomes)

        monkeypatch.setattr(tokens_repo, "load_tokens", load_then_hold)
        monkeypatch.setattr(claims_repo, "finalise_sent_many", write_then_tell)
        clock.advance(1000)
        assert await replay.run_due() is None  # the run going on claims B
        await claim_waits.wait()
        release_a.set()
        assert await run == 2

        replays = homeserver.replays()
        assert [r.url.path.rsplit("/", 1)[-1] for r in replays] == [
            f"msc4140.{first}",
            f"msc4140.{second}",
        ]
        assert [bearer(r) for r in replays] == ["alice_token", "alice_token"]
        assert [row["status"] for row in await rows(app)] == ["sent", "sent"]
        assert await tokens(app) == []
