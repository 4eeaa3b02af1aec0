"""Readiness and the figures `/metrics` reads from the database, for the operators' endpoints."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import metrics
from app import repository_health as health_repo
from app.clock import Clock
from app.settings import Settings

logger = logging.getLogger(__name__)

_DB_CHECK_SECONDS = 2.0
# Up to this many scheduled events the gauge is an exact count (an index-only read of at most this
# many entries); beyond it, PostgreSQL's estimate.
SCHEDULED_EXACT_UP_TO = 10_000
_HORIZON_MARGIN_MS = 60_000


class SchedulerState(Protocol):
    @property
    def running(self) -> bool: ...

    @property
    def draining(self) -> bool: ...


class HealthService:
    def __init__(
        self, engine: AsyncEngine, scheduler: SchedulerState, clock: Clock, settings: Settings
    ) -> None:
        self._engine = engine
        self._scheduler = scheduler
        self._clock = clock
        self._settings = settings

    async def readiness(self) -> dict[str, str]:
        """Each check's state: `ok`, or what is wrong (the database unreachable, the scheduler
        stopped or draining while the replica shuts down)."""
        if self._scheduler.draining:
            # Shutting down: the load balancer sends new requests elsewhere.
            status = "draining"
        else:
            status = "ok" if self._scheduler.running else "stopped"
        checks = {"database": "ok", "scheduler": status}
        try:
            async with asyncio.timeout(_DB_CHECK_SECONDS):
                async with self._engine.connect() as conn:
                    await health_repo.ping(conn)
        except Exception:
            checks["database"] = "unreachable"
        return checks

    async def update_gauges(self) -> None:
        """Set the gauges read from the process and the database; a database that does not answer
        in time is counted as a scrape error, and the gauges keep their last values."""
        metrics.DATABASE_POOL_IN_USE.set(self._checked_out())
        try:
            async with asyncio.timeout(_DB_CHECK_SECONDS):
                async with self._engine.connect() as conn:
                    await database_figures(conn, self._clock.now_ms(), self._overdue_horizon_ms())
        except Exception:
            metrics.SCRAPE_ERRORS.inc()
            logger.warning("could not read the database figures for /metrics")

    def _checked_out(self) -> int:
        checkedout = getattr(self._engine.sync_engine.pool, "checkedout", None)
        return int(checkedout()) if checkedout is not None else 0

    def _overdue_horizon_ms(self) -> int:
        """How far past now a row still waiting for its first send can have its `due_ts`: a retry
        is put off by at most the longest backoff (with its jitter), a claim by one lease."""
        s = self._settings
        longest = max(s.retry_max_backoff_seconds * 1.1, s.claim_lease_seconds)
        return int(longest * 1000) + _HORIZON_MARGIN_MS


async def database_figures(conn: AsyncConnection, now: int, horizon_ms: int) -> None:
    """Set the scheduled count and the oldest overdue event's age, each read through an index
    (`app.repository_health`)."""
    metrics.SCHEDULED_NOW.set(await health_repo.count_scheduled(conn, SCHEDULED_EXACT_UP_TO))
    oldest = await health_repo.oldest_overdue_send_ts(conn, now, horizon_ms)
    metrics.OLDEST_OVERDUE_SECONDS.set(0 if oldest is None else max(0, now - oldest) / 1000)
