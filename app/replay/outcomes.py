"""The outcomes of sent events, written in batches in the background, and how a send is
counted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app import repository_claims as claims_repo
from app.logs import LogId
from app.models import DelayedEvent

logger = logging.getLogger(__name__)


def log_id(delay_id: str) -> str:
    """How logs name an event: the first characters of its delay_id, enough to find its row but
    not to act on it (a whole delay_id lets a tokenless call send, cancel or restart it)."""
    return LogId(delay_id[:6] + "...")


def count_sent(event: DelayedEvent, reason: str, sent_at: int, *, done: bool) -> None:
    metrics.SENT.labels(event.generation, reason).inc()
    if reason == "delay":
        metrics.LATENESS_SECONDS.observe(max(0, sent_at - event.send_ts) / 1000)
    if not done:
        logger.warning("sent %s, but its claim had lapsed", log_id(event.delay_id))


class OutcomeWriter:
    """Writes the outcomes of a run's sent events in the background, as many to a statement as
    have come in meanwhile, while each room goes on with its next event.

    Sending on before an outcome is committed keeps every guarantee: a message repeated after a
    crash carries the same transaction id and lands once, in its place; and the next delayed state
    event for the same (room, type, state_key) can't be claimed before this one's outcome is
    committed (`due_repo.claim_due`), so per-key order does not depend on this writer. A write
    that fails leaves the rows claimed; their lease runs out and they are replayed (as the same
    events). The run ends only once every outcome is written. Refusals and retries are written
    by the room itself, before it goes on."""

    def __init__(
        self, engine: AsyncEngine, on_written: Callable[[list[claims_repo.SentOutcome]], None]
    ) -> None:
        self._engine = engine
        self._on_written = on_written
        self._queue: list[claims_repo.SentOutcome] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def put(self, outcome: claims_repo.SentOutcome) -> None:
        self._queue.append(outcome)
        self._idle.clear()
        self._ready.set()

    async def flush(self) -> None:
        """Wait until every outcome put so far is written (or its write has failed)."""
        await self._idle.wait()

    async def close(self) -> None:
        self._closing = True
        self._ready.set()
        await self._task

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                outcomes, self._queue = self._queue, []
                await self._write(outcomes)
            self._idle.set()
            if self._closing:
                return

    async def _write(self, outcomes: list[claims_repo.SentOutcome]) -> None:
        try:
            async with self._engine.begin() as conn:
                done = await claims_repo.finalise_sent_many(conn, outcomes)
        except Exception:
            logger.exception(
                "writing the outcome of %d sent events failed; they are replayed when their "
                "claim lapses",
                len(outcomes),
            )
        else:
            for outcome in outcomes:
                count_sent(
                    outcome.event, outcome.reason, outcome.ts, done=outcome.event.delay_id in done
                )
        self._on_written(outcomes)
