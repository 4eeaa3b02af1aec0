"""Which replicas are alive, as PostgreSQL sees it.

Each replica holds a session-level advisory lock, `(4140, key)` with a random `key`, on a
connection of its own kept open for the life of the process. Its claims carry the key
(`claims_repo.new_claim_id`), so a claim whose key no session holds belongs to a replica that is
gone (killed, or cut off from the database): `claims_repo.free_dead_claims` makes such rows due
at once instead of at the end of their lease.

A replica that loses the connection holding its lock (a PostgreSQL restart, a network blip) takes
a new key when it gets a new connection: its earlier claims then count as dead and are claimed
anew (by any replica), and every send it still had queued under them fails its re-check
(`claims_repo.recheck_claim`), so two live replicas never both believe they hold a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger(__name__)

LOCK_CLASS = 4140

_TRY_LOCK = text("SELECT pg_try_advisory_lock(:class_id, :key)")
# A dead host's connection is noticed by the server within about 5 + 2 * 3 seconds.
_KEEPALIVES = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)


class ReplicaLock:
    """Holds this replica's advisory lock and checks, every `check_seconds`, that it still does;
    `key` is the key held, or None while it holds none (claims then carry no key and fall back
    to their lease alone)."""

    def __init__(self, engine: AsyncEngine, check_seconds: float) -> None:
        self._engine = engine
        self._check_seconds = check_seconds
        self._conn: AsyncConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.key: int | None = None

    async def start(self) -> None:
        """Take a lock now (if the database answers) and keep checking it in the background."""
        await self.acquire()
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Give the lock up (closing its connection ends the session, which releases it)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()

    async def acquire(self) -> bool:
        """Open a connection and take a fresh key on it; False if the database can't be reached."""
        await self._drop()
        try:
            conn = await self._engine.connect()
        except Exception:
            logger.warning("could not take this replica's lock; the database may be away")
            return False
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            for statement in _KEEPALIVES:
                # Not every server lets a session set these (nor needs them, on a local socket).
                with contextlib.suppress(Exception):
                    await conn.execute(text(statement))
            while True:
                key = secrets.randbelow(2**31 - 1) + 1
                taken = await conn.execute(_TRY_LOCK, {"class_id": LOCK_CLASS, "key": key})
                if taken.scalar_one():
                    break
        except Exception:
            logger.warning("could not take this replica's lock; the database may be away")
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()
            return False
        self._conn = conn
        self.key = key
        logger.info("holding replica lock %d", key)
        return True

    async def check(self) -> bool:
        """Whether the lock is still held (its connection still answers); if not, forget it."""
        conn = self._conn
        if conn is None:
            return False
        try:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=self._check_seconds * 5)
        except Exception:
            logger.warning("lost the connection holding replica lock %s", self.key)
            await self._drop()
            return False
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._check_seconds)
            if not await self.check():
                await self.acquire()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.key = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()


__all__ = ["LOCK_CLASS", "ReplicaLock"]
