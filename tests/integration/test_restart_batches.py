"""Restarts that arrive together are written in one batch; each still gets the answer it would
have had alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository as repo
from app import restarts as restarts_module
from app.crypto import TokenCipher
from app.restarts import RestartBatcher
from tests.integration.common import (
    ALICE,
    ALICE_2,
    ALICE_PHONE,
    BOB,
    V1,
    act,
    assert_error,
    rows,
    schedule_message,
)
from tests.support.fakes import FakeClock, FakeHomeserver


async def test_restarts_in_one_batch_are_answered_each_for_its_own_event(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    start = clock.now_ms()
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 20_000, txn="b", headers=BOB)
    clock.advance(3000)
    answers = await asyncio.gather(
        act(client, alices, "restart", headers=BOB),  # not Bob's: not found, batch or not
        act(client, alices, "restart", headers=ALICE_2),
        act(client, bobs, "restart"),  # no token: the delay_id is the capability
        act(client, "no-such-id", "restart", headers=ALICE),
        act(client, bobs, "restart", prefix=V1, headers=ALICE),
    )
    assert [r.status_code for r in answers] == [404, 200, 200, 404, 404]
    send_ts = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    assert send_ts == {alices: start + 3000 + 10_000, bobs: start + 3000 + 20_000}


async def test_a_restart_after_the_event_was_cancelled_is_not_found(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    delay_id = await schedule_message(client, 10_000)
    assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
    answers = await asyncio.gather(
        *(act(client, delay_id, "restart", headers=ALICE) for _ in range(5))
    )
    assert {r.status_code for r in answers} == {404}


@dataclass(eq=False)
class Batch:
    """A batch as the repository was asked to write it."""

    delay_ids: list[str]
    devices: list[tuple[str, str | None]]
    backend: int  # the server process of the connection it is written on
    conn: AsyncConnection
    release: asyncio.Event = field(default_factory=asyncio.Event)
    written: asyncio.Event = field(default_factory=asyncio.Event)
    # Raised instead of writing the batch, once released.
    error: Exception | None = None


class Batches:
    """Stands in for `repository.restart_many`: notes each batch and, while `hold` is set, keeps
    it from being written until the test releases it. Notes too each restart handed to the
    batcher, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, batcher: RestartBatcher) -> None:
        self.seen: list[Batch] = []
        self.queued: list[str] = []
        self.hold = True
        self._changed = asyncio.Event()
        self._write = repo.restart_many
        self._restart = batcher.restart
        monkeypatch.setattr(repo, "restart_many", self._restart_many)
        monkeypatch.setattr(batcher, "restart", self._queue)

    async def _queue(self, delay_id: str, owner: str | None, token: Any) -> bool:
        self.queued.append(delay_id)
        self._changed.set()
        return await self._restart(delay_id, owner, token)

    async def _restart_many(
        self, conn: AsyncConnection, requests: list[tuple[str, str | None]], tokens: Any, now: int
    ) -> set[tuple[str, str]]:
        backend = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        batch = Batch(sorted(delay_id for delay_id, _ in requests), sorted(tokens), backend, conn)
        self.seen.append(batch)
        self._changed.set()
        if self.hold:
            await batch.release.wait()
        if batch.error is not None:
            raise batch.error
        try:
            return await self._write(conn, requests, tokens, now)
        finally:
            batch.written.set()

    async def arrived(self, count: int) -> Batch:
        """The `count`th batch, once it has reached the repository."""
        await self._until(lambda: len(self.seen) >= count)
        return self.seen[count - 1]

    async def handed_over(self, delay_id: str) -> None:
        """Once a restart of `delay_id` has been handed to the batcher."""
        await self._until(lambda: delay_id in self.queued)

    async def _until(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(GUARD_SECONDS):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def batches(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Batches]:
    noted = Batches(monkeypatch, app.state.container.service.restarts)
    yield noted
    # A failed test may leave batches held: let them go, so the app can close.
    for batch in noted.seen:
        batch.release.set()


# Only ever waited out when a test fails (something that should happen does not).
GUARD_SECONDS = 10


def started(coro: Coroutine[Any, Any, httpx.Response]) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(coro)


async def wait_until_waiting_for_a_lock(app: FastAPI, backend: int) -> None:
    """Until the server process `backend` waits for a row lock (as PostgreSQL itself says)."""
    async with asyncio.timeout(GUARD_SECONDS), app.state.container.engine.connect() as conn:
        while True:
            result = await conn.execute(
                text("SELECT 1 FROM pg_locks WHERE NOT granted AND pid = :pid"), {"pid": backend}
            )
            if result.first() is not None:
                return
            await asyncio.sleep(0.005)


async def end_backend(app: FastAPI, backend: int) -> None:
    """End a connection from the server's side (a restart, an idle timeout), and wait until its
    server process has exited; its client has not noticed yet. PostgreSQL itself waits: what
    pg_stat_activity shows is frozen for the rest of a transaction once read, so polling it
    could see the ending process forever."""
    async with app.state.container.engine.connect() as conn:
        ended = await conn.execute(
            text("SELECT pg_terminate_backend(:pid, :wait_ms)"),
            {"pid": backend, "wait_ms": GUARD_SECONDS * 1000},
        )
        assert ended.scalar_one() is True, "the server process did not exit"


def stored_digest(app: FastAPI, user_id: str, device_id: str) -> Any:
    async def digest() -> bytes:
        async with app.state.container.engine.connect() as conn:
            result = await conn.execute(
                text("SELECT digest FROM device_token WHERE user_id = :u AND device_id = :d"),
                {"u": user_id, "d": device_id},
            )
            return bytes(result.scalar_one())

    return digest()


async def test_a_second_batch_is_written_while_the_first_is_still_being_written(
    client: httpx.AsyncClient, app: FastAPI, batches: Batches
) -> None:
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 10_000, txn="b", headers=BOB)
    first = started(act(client, alices, "restart", headers=ALICE))
    one = await batches.arrived(1)
    second = started(act(client, bobs, "restart", headers=BOB))
    two = await batches.arrived(2)
    assert (one.delay_ids, two.delay_ids) == ([alices], [bobs])
    assert one.backend != two.backend
    two.release.set()
    assert (await second).status_code == 200
    assert not first.done()
    one.release.set()
    assert (await first).status_code == 200


async def test_an_event_in_a_batch_being_written_waits_for_the_next_batch(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, batches: Batches
) -> None:
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 20_000, txn="b", headers=BOB)
    first = started(act(client, alices, "restart", headers=ALICE))
    one = await batches.arrived(1)
    clock.advance(1000)
    again = started(act(client, alices, "restart"))  # tokenless, the same event
    bob = started(act(client, bobs, "restart", headers=BOB))
    two = await batches.arrived(2)
    assert two.delay_ids == [bobs]
    two.release.set()
    assert (await bob).status_code == 200
    one.release.set()
    three = await batches.arrived(3)
    assert three.delay_ids == [alices]
    three.release.set()
    assert [(await first).status_code, (await again).status_code] == [200, 200]
    send_ts = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    assert send_ts[alices] == clock.now_ms() + 10_000  # the later restart was written last


async def test_a_new_token_of_a_device_in_a_batch_being_written_waits_for_the_next_batch(
    client: httpx.AsyncClient, app: FastAPI, batches: Batches
) -> None:
    """Two batches never write the same device's token row at the same time (so never lock it
    crosswise with their events), and the device ends with the token it presented last: once
    one of its restarts waits, its later ones wait too."""
    first_event = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    second_event = await schedule_message(client, 10_000, txn="b", headers=ALICE)
    third_event = await schedule_message(client, 10_000, txn="c", headers=ALICE)
    phones = await schedule_message(client, 10_000, txn="d", headers=ALICE_PHONE)
    first = started(act(client, first_event, "restart", headers=ALICE))
    one = await batches.arrived(1)
    assert one.devices == [("@alice:test", "ALICEDEV")]
    newer = started(act(client, second_event, "restart", headers=ALICE_2))  # same device
    await batches.handed_over(second_event)
    latest = started(act(client, third_event, "restart", headers=ALICE))  # the first token again
    phone = started(act(client, phones, "restart", headers=ALICE_PHONE))
    two = await batches.arrived(2)
    assert (two.delay_ids, two.devices) == ([phones], [("@alice:test", "PHONE")])
    two.release.set()
    assert (await phone).status_code == 200
    one.release.set()
    three = await batches.arrived(3)
    assert three.delay_ids == sorted([second_event, third_event])
    assert three.devices == [("@alice:test", "ALICEDEV")]
    three.release.set()
    assert [(await r).status_code for r in (first, newer, latest)] == [200, 200, 200]
    cipher = TokenCipher(app.state.container.settings.token_keys)
    assert await stored_digest(app, "@alice:test", "ALICEDEV") == cipher.digest("alice_token")


async def test_the_same_token_rides_on_the_batch_being_written_and_waits_for_its_commit(
    client: httpx.AsyncClient, app: FastAPI, batches: Batches
) -> None:
    """A restart carrying the token a batch being written writes for its device goes in the
    next batch without it, and is answered only once that first batch has committed too."""
    first_event = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    second_event = await schedule_message(client, 10_000, txn="b", headers=ALICE)
    phones = await schedule_message(client, 10_000, txn="c", headers=ALICE_PHONE)
    first = started(act(client, first_event, "restart", headers=ALICE))
    one = await batches.arrived(1)
    rider = started(act(client, second_event, "restart", headers=ALICE))
    two = await batches.arrived(2)
    assert (two.delay_ids, two.devices) == ([second_event], [])
    two.release.set()
    await two.written.wait()
    # A later restart, written and answered after the rider's batch, is answered first.
    phone = started(act(client, phones, "restart", headers=ALICE_PHONE))
    three = await batches.arrived(3)
    three.release.set()
    assert (await phone).status_code == 200
    assert not rider.done(), "answered before its token was written"
    one.release.set()
    assert [(await first).status_code, (await rider).status_code] == [200, 200]


async def test_a_rider_gets_the_error_of_the_batch_that_was_to_write_its_token(
    client: httpx.AsyncClient, app: FastAPI, batches: Batches
) -> None:
    first_event = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    second_event = await schedule_message(client, 10_000, txn="b", headers=ALICE)
    first = started(act(client, first_event, "restart", headers=ALICE))
    one = await batches.arrived(1)
    rider = started(act(client, second_event, "restart", headers=ALICE))
    two = await batches.arrived(2)
    two.release.set()
    await two.written.wait()
    one.error = DBAPIError("restart", {}, Exception("deadlock detected"))
    one.release.set()
    assert (await first).status_code == 500
    assert (await rider).status_code == 500


class HeldClose(asyncio.Protocol):
    """Sits between a connection's socket and its driver: passes on what the server sends, but
    holds back the news that the server has closed the socket (as when the server's last
    message has been read and its close has not yet arrived)."""

    def __init__(self, driver: Any) -> None:
        self._driver = driver
        self.closed = asyncio.Event()
        self._lost: list[Exception | None] = []

    def data_received(self, data: bytes) -> None:
        self._driver.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # the transport then closes, and reports the close below

    def pause_writing(self) -> None:
        self._driver.pause_writing()

    def resume_writing(self) -> None:
        self._driver.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost.append(exc)
        self.closed.set()

    def let_go(self) -> None:
        for exc in self._lost:
            self._driver.connection_lost(exc)
        self._lost.clear()


async def hold_close(conn: AsyncConnection) -> HeldClose:
    raw = await conn.get_raw_connection()
    transport = raw.driver_connection._transport  # type: ignore[union-attr]
    held = HeldClose(transport.get_protocol())
    transport.set_protocol(held)
    return held


@pytest.mark.parametrize("between", [False, True], ids=["mid-batch", "between-batches"])
@pytest.mark.parametrize("close", ["noticed", "not-yet-noticed"])
async def test_a_kept_connection_found_broken_is_replaced_and_the_batch_written_again(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    batches: Batches,
    between: bool,
    close: str,
) -> None:
    """The server ends a kept connection (a restart, an idle timeout): its last message says
    so, then it closes the socket. The next batch on it is written again on a new connection,
    whether the close has been noticed by then or only the message has been read."""
    delay_id = await schedule_message(client, 10_000, headers=ALICE)
    batches.hold = True
    if between:
        first = started(act(client, delay_id, "restart", headers=ALICE))
        kept = await batches.arrived(1)
        kept.release.set()
        assert (await first).status_code == 200
        backend, conn = kept.backend, kept.conn
    else:
        clock.advance(1000)
        restart = started(act(client, delay_id, "restart", headers=ALICE))
        broken = await batches.arrived(1)
        backend, conn = broken.backend, broken.conn
    held = await hold_close(conn)
    try:
        await end_backend(app, backend)
        async with asyncio.timeout(GUARD_SECONDS):
            await held.closed.wait()  # so the server's last message has been read
        if close == "noticed":
            held.let_go()
        if between:
            # Its first statement on the kept connection fails before the batch is noted.
            clock.advance(1000)
            restart = started(act(client, delay_id, "restart", headers=ALICE))
        else:
            broken.release.set()
        again = await batches.arrived(2)
        again.release.set()
        assert (await restart).status_code == 200
    finally:
        held.let_go()
    assert again.backend != backend
    [row] = await rows(app)
    assert row["send_ts"] == clock.now_ms() + 10_000


@pytest.mark.parametrize("action", ["cancel", "send"])
async def test_a_restart_waiting_for_a_cancel_or_send_that_commits_first_is_refused(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
    batches: Batches,
    action: str,
) -> None:
    """The cancel (or the send's claim) has changed the event and holds its row until it
    commits; the restart's batch waits for it in the database, then leaves the event alone and
    is refused, while another batch is written and answered meanwhile."""
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 10_000, txn="b", headers=BOB)
    before = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    changed, commit = asyncio.Event(), asyncio.Event()
    name = "cancel" if action == "cancel" else "claim_one"
    change = getattr(repo, name)

    async def change_then_hold(*args: Any) -> Any:
        result = await change(*args)
        changed.set()
        await commit.wait()
        return result

    monkeypatch.setattr(repo, name, change_then_hold)
    batches.hold = False
    acting = started(act(client, alices, action, headers=ALICE))
    try:
        await changed.wait()
        restart = started(act(client, alices, "restart", headers=ALICE))
        one = await batches.arrived(1)
        await wait_until_waiting_for_a_lock(app, one.backend)
        assert (await act(client, bobs, "restart", headers=BOB)).status_code == 200
        assert not restart.done()
    finally:
        commit.set()
    assert (await acting).status_code == 200
    assert (await restart).status_code == 404
    [row] = [row for row in await rows(app) if row["delay_id"] == alices]
    assert row["status"] == ("cancelled" if action == "cancel" else "sent")
    assert row["send_ts"] == before[alices]
    if action == "send":
        assert len(homeserver.replays()) == 1


async def test_a_restart_whose_caller_has_gone_is_not_written(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, batches: Batches
) -> None:
    """While both batches being written are held up (a database stall), a restart waits; its
    caller gives up (times out, disconnects). The next batch leaves it out: the event keeps the
    delay the caller was told it still has."""
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 10_000, txn="b", headers=BOB)
    gone = await schedule_message(client, 10_000, txn="c", headers=ALICE)
    later = await schedule_message(client, 10_000, txn="d", headers=BOB)
    before = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    first = started(act(client, alices, "restart", headers=ALICE))
    one = await batches.arrived(1)
    second = started(act(client, bobs, "restart", headers=BOB))
    two = await batches.arrived(2)
    clock.advance(1000)
    batcher = app.state.container.service.restarts
    waiting = asyncio.create_task(batcher.restart(gone, None, None))
    await batches.handed_over(gone)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    also = started(act(client, later, "restart"))
    await batches.handed_over(later)
    one.release.set()
    three = await batches.arrived(3)
    assert three.delay_ids == [later]
    three.release.set()
    two.release.set()
    assert [(await r).status_code for r in (first, second, also)] == [200, 200, 200]
    send_ts = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    assert send_ts[gone] == before[gone]
    assert send_ts[later] == clock.now_ms() + 10_000


async def test_restarts_beyond_the_waiting_bound_are_refused_as_unavailable(
    client: httpx.AsyncClient,
    app: FastAPI,
    batches: Batches,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(restarts_module, "MAX_WAITING", 1)
    ids = [await schedule_message(client, 10_000, txn=f"t{n}") for n in range(4)]
    held = [started(act(client, ids[0], "restart"))]
    one = await batches.arrived(1)
    held.append(started(act(client, ids[1], "restart")))
    two = await batches.arrived(2)
    queued = started(act(client, ids[2], "restart"))
    await batches.handed_over(ids[2])
    refused = await act(client, ids[3], "restart")
    assert_error(refused, 503, "M_UNKNOWN")
    one.release.set()
    three = await batches.arrived(3)
    assert three.delay_ids == [ids[2]]
    three.release.set()
    two.release.set()
    assert [(await r).status_code for r in (*held, queued)] == [200, 200, 200]


async def test_a_closed_batcher_refuses_restarts(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    delay_id = await schedule_message(client, 10_000)
    before = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    await app.state.container.service.restarts.close()
    clock.advance(1000)
    assert_error(await act(client, delay_id, "restart"), 503, "M_UNKNOWN")
    assert {row["delay_id"]: row["send_ts"] for row in await rows(app)} == before
