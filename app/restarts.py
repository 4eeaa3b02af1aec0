"""Restarts in batches. The heartbeat of every call participant is a restart every few seconds;
restarts that arrive while earlier batches are being written share the next one: a single
statement restarts them all and refreshes their devices' tokens, committed on its own. Each caller
is answered only after that commit, with the outcome for its own event, so a restart answered 200
is in the database exactly as if it had had a transaction of its own.

Two batches are written at a time, so a restart waits for at most about one statement's round
trip before its own is sent. Each is written on a connection the batcher keeps (a pool checkout
costs a liveness check of three round trips); a kept connection found broken is replaced and the
batch written again, once. Batches written at the same time share no rows: a restart of an event
that a batch being written restarts, or one carrying a new token for a device whose token such a
batch writes, waits for the next batch. So two batches never wait for each other's row locks, let
alone deadlock. A restart carrying the same token as the batch being written for its device
leaves the token to that batch, and is answered once both are committed.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import repository as repo
from app.clock import Clock
from app.errors import DatabaseUnavailable
from app.replay.tokens import SealedToken

# Bounds a statement's size; more waiting restarts simply make the next batch.
MAX_BATCH = 500
# Batches written at the same time, each on a connection of its own.
IN_FLIGHT = 2
# Restarts that may wait for a batch; more are refused (503) until the database catches up.
MAX_WAITING = 10_000

# A device: (user_id, device_id).
Device = tuple[str, str | None]


@dataclass(eq=False, slots=True)
class _Restart:
    delay_id: str
    owner: str | None
    token: SealedToken | None
    answer: asyncio.Future[bool]
    # The batch being written that writes this restart's token (the same one) for it.
    token_by: _Batch | None = None


@dataclass(eq=False, slots=True)
class _Batch:
    restarts: list[_Restart] = field(default_factory=list)
    delay_ids: set[str] = field(default_factory=set)
    tokens: dict[Device, SealedToken] = field(default_factory=dict)
    done: bool = False
    error: BaseException | None = None
    # Restarts of other batches whose tokens this one writes: answered when it is done.
    riders: list[tuple[_Restart, bool]] = field(default_factory=list)


def _settle(restart: _Restart, restarted: bool, error: BaseException | None) -> None:
    if restart.answer.done():  # the caller has gone
        return
    if error is not None:
        restart.answer.set_exception(error)
    else:
        restart.answer.set_result(restarted)


class RestartBatcher:
    def __init__(self, engine: AsyncEngine, clock: Clock) -> None:
        self._engine = engine
        self._clock = clock
        self._waiting: list[_Restart] = []
        self._in_flight: list[_Batch] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Writers that will look for a batch again: one that finds none stops counting at once,
        # so a restart handed over from then on starts another.
        self._writers = 0
        self._kept: list[AsyncConnection] = []  # connections no writer is using
        self._closed = False

    async def restart(self, delay_id: str, owner: str | None, token: SealedToken | None) -> bool:
        """Restart the delay of `delay_id` (only if `owner` owns it, when given) from the time its
        batch is written, and refresh the caller's stored token; whether it was restarted.
        Database errors are raised to every caller of the batch. Refused (503 M_UNKNOWN) once
        closed, and while `MAX_WAITING` restarts wait already: the database has fallen behind,
        and the client tries again later, as after any failed restart."""
        if self._closed:
            raise DatabaseUnavailable("The service is shutting down, try again")
        if len(self._waiting) >= MAX_WAITING:
            self._waiting = [r for r in self._waiting if not r.answer.done()]
            if len(self._waiting) >= MAX_WAITING:
                raise DatabaseUnavailable("Database busy, try again")
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Restart(delay_id, owner, token, answer))
        if self._writers < IN_FLIGHT:
            self._writers += 1
            writer = asyncio.create_task(self._write_all())
            self._tasks.add(writer)
            writer.add_done_callback(self._tasks.discard)
        return await answer

    async def close(self) -> None:
        """Refuse new restarts, let the batches under way finish, and give the kept connections
        back."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        kept, self._kept = self._kept, []
        for conn in kept:
            await conn.close()

    def _take(self) -> _Batch | None:
        """The next batch: the waiting restarts (oldest first, up to MAX_BATCH) that share no row
        with a batch being written. Of one device, a restart waits whenever an earlier one waits,
        so its newest token is the one written last. A restart whose caller has gone (timed
        out, disconnected) is dropped: it was not answered 200, so it must not be written."""
        busy_ids: set[str] = set()
        busy_tokens: dict[Device, tuple[bytes, _Batch]] = {}
        for other in self._in_flight:
            busy_ids |= other.delay_ids
            for key, sealed in other.tokens.items():
                busy_tokens[key] = (sealed.digest, other)
        batch = _Batch()
        held: list[_Restart] = []
        held_devices: set[Device | None] = set()
        for restart in self._waiting:
            if restart.answer.done():
                continue  # the caller has gone
            token = restart.token
            device = (token.user_id, token.device_id) if token is not None else None
            busy = busy_tokens.get(device) if device is not None else None
            if (
                len(batch.restarts) >= MAX_BATCH
                or restart.delay_id in busy_ids
                or (device is not None and device in held_devices)
                or (busy is not None and token is not None and busy[0] != token.digest)
            ):
                held.append(restart)
                held_devices.add(device)
                continue
            if busy is not None:
                restart.token_by = busy[1]
            elif device is not None and token is not None:
                batch.tokens[device] = token  # the newest token of each device wins
            batch.restarts.append(restart)
            batch.delay_ids.add(restart.delay_id)
        self._waiting = held
        return batch if batch.restarts else None

    async def _write_all(self) -> None:
        conn = self._kept.pop() if self._kept else None
        counted = True
        try:
            while (batch := self._take()) is not None:
                self._in_flight.append(batch)
                try:
                    conn, restarted = await self._write(conn, batch)
                except BaseException as exc:
                    conn = None  # given up by _write
                    self._done(batch, exc, set())
                    if not isinstance(exc, Exception):
                        raise
                    continue
                self._done(batch, None, restarted)
            # Whatever still waits shares rows with a batch being written, whose writer takes it.
            self._writers -= 1
            counted = False
        finally:
            if counted:
                self._writers -= 1
            if conn is not None:
                if self._closed:
                    await conn.close()
                else:
                    self._kept.append(conn)

    def _done(
        self, batch: _Batch, error: BaseException | None, restarted: set[tuple[str, str]]
    ) -> None:
        """Answer the batch's callers, and those whose tokens it wrote for them."""
        self._in_flight.remove(batch)
        batch.done, batch.error = True, error
        ids = {delay_id for delay_id, _ in restarted}
        for restart in batch.restarts:
            if error is not None:
                _settle(restart, False, error)
                continue
            if restart.owner is not None:
                ok = (restart.delay_id, restart.owner) in restarted
            else:
                ok = restart.delay_id in ids
            token_by = restart.token_by
            if token_by is not None and not token_by.done:
                token_by.riders.append((restart, ok))
            else:
                _settle(restart, ok, token_by.error if token_by is not None else None)
        for restart, ok in batch.riders:
            _settle(restart, ok, error)
        batch.riders.clear()

    async def _write(
        self, conn: AsyncConnection | None, batch: _Batch
    ) -> tuple[AsyncConnection, set[tuple[str, str]]]:
        """Write the batch on `conn` (or a new connection), and once more on a new one if that one
        is found broken; the connection it was written on, and what it restarted."""
        try:
            return await self._write_on(conn, batch)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        # Broken (closed by the server while kept, most likely): written on a new one. Should
        # the first have committed after all, restarting twice only moves the delay's start on.
        return await self._write_on(None, batch)

    async def _write_on(
        self, conn: AsyncConnection | None, batch: _Batch
    ) -> tuple[AsyncConnection, set[tuple[str, str]]]:
        """One statement, committed on its own: no BEGIN and COMMIT round trips."""
        if conn is None:
            conn = await self._connect()
        requests = [(restart.delay_id, restart.owner) for restart in batch.restarts]
        tokens = {device: (t.token, t.digest) for device, t in batch.tokens.items()}
        try:
            return conn, await repo.restart_many(conn, requests, tokens, self._clock.now_ms())
        except BaseException:
            await _give_up(conn)
            raise

    async def _connect(self) -> AsyncConnection:
        conn = await self._engine.connect()
        return await conn.execution_options(isolation_level="AUTOCOMMIT")


async def _give_up(conn: AsyncConnection) -> None:
    """Close a connection a statement failed on, rather than use it again: it may be broken, or
    still busy with a cancelled statement."""
    with contextlib.suppress(Exception):
        await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()
