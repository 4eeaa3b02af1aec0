"""APScheduler as the alarm clock: one wake-up job at the earliest due time, a periodic sweep, a
frequent cheap check for the claims of replicas that are gone, and the pruning of finalised
history. The table is the store; no job exists per event."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from app.clock import Clock
from app.replay.wakeup import WakeUp, wake_up_time

logger = logging.getLogger(__name__)

WAKE_JOB = "wake"


class WakeUpScheduler:
    """Runs `run_due` when the earliest event is due, then asks `next_due` when to wake again.
    The times come through `wakeup`, which this clock's alarm answers once started.

    `run_due` answers None when a run is already going on: it has been told that more may be
    due, and sets the wake-ups it needs while it goes on; the run's own tick asks `next_due`
    when the run ends."""

    def __init__(
        self,
        *,
        wakeup: WakeUp,
        run_due: Callable[[], Awaitable[int | None]],
        next_due: Callable[[], Awaitable[int | None]],
        prune: Callable[[], Awaitable[int]],
        clock: Clock,
        sweep_seconds: float,
        prune_seconds: float,
        free_dead_claims: Callable[[], Awaitable[int]] | None = None,
        check_seconds: float = 1.0,
    ) -> None:
        self._wakeup = wakeup
        self._run_due = run_due
        self._next_due = next_due
        self._prune = prune
        self._clock = clock
        self._sweep_seconds = sweep_seconds
        self._prune_seconds = prune_seconds
        self._free_dead_claims = free_dead_claims
        self._check_seconds = check_seconds
        self._scheduler = AsyncIOScheduler(timezone=UTC)

    @property
    def wake_at(self) -> int | None:
        """When the alarm is set for, if it is."""
        return self._wakeup.wake_at

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def start(self) -> None:
        """Start the clock; overdue events are replayed at once, in send-time order."""
        self._scheduler.start()
        self._scheduler.add_job(
            self.tick,
            IntervalTrigger(seconds=self._sweep_seconds),
            id="sweep",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self._prune_job,
            IntervalTrigger(seconds=self._prune_seconds),
            id="prune",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        if self._free_dead_claims is not None:
            self._scheduler.add_job(
                self._check_job,
                IntervalTrigger(seconds=self._check_seconds),
                id="dead-claims",
                max_instances=1,
                coalesce=True,
            )
        self._wakeup.start(self._set_alarm, self._clock.now_ms())

    @property
    def draining(self) -> bool:
        """The replica is shutting down: no wake-up, sweep or check runs any more."""
        return self._wakeup.stopped

    def drain(self) -> None:
        """Stop every job from starting again (a job already running goes on; the replay's
        drain ends its run); `wake` does nothing from now on."""
        self._wakeup.stop()
        if self._scheduler.running:
            self._scheduler.pause()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def wake(self, at_ms: int) -> None:
        """Make sure the scheduler wakes by `at_ms`; a later time than the one set is a no-op."""
        self._wakeup.wake(at_ms)

    def _set_alarm(self, at_ms: int) -> None:
        if not self._scheduler.running:
            return
        self._scheduler.add_job(
            self.tick,
            DateTrigger(run_date=datetime.fromtimestamp(at_ms / 1000, UTC)),
            id=WAKE_JOB,
            replace_existing=True,
            misfire_grace_time=None,
            # A wake-up that comes while an earlier one is still running (a long run) pokes it.
            max_instances=1000,
        )

    async def tick(self) -> None:
        """Replay what is due, then set the wake-up for the next due event."""
        self._wakeup.rung()
        # Whatever was due when the run began, the run tried to claim; if it is due still, it
        # was passed over (`wake_up_time`), and the next try waits a little.
        started = self._clock.now_ms()
        try:
            if await self._run_due() is None:
                return  # a run is going on; it has been poked and sets its own wake-ups
            next_due = await self._next_due()
        except Exception:
            # The database may be away; the sweep tries again.
            logger.exception("replaying due events failed")
            return
        if next_due is not None:
            self.wake(wake_up_time(next_due, started, self._clock.now_ms()))

    async def _check_job(self) -> None:
        """Free the claims of replicas that are gone, and replay them now if there were any, or
        if anything else is due that this replica was not woken for (claims a replica gave back
        when it shut down, events scheduled through another replica)."""
        assert self._free_dead_claims is not None
        try:
            freed = await self._free_dead_claims()
            next_due = None if freed else await self._next_due()
        except Exception:
            logger.exception("checking for the claims of replicas that are gone failed")
            return
        now = self._clock.now_ms()
        if freed:
            logger.info("took over %d events claimed by a replica that is gone", freed)
            self.wake(now)
        elif next_due is not None and next_due <= now:
            self.wake(next_due)

    async def _prune_job(self) -> None:
        try:
            removed = await self._prune()
        except Exception:
            logger.exception("pruning finalised events failed")
            return
        if removed:
            logger.info("pruned %d finalised delayed events", removed)
