from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from app.replay import WakeUp
from app.replay.wakeup import RETRY_PASSED_OVER_MS, wake_up_time
from app.scheduler import WAKE_JOB, WakeUpScheduler
from tests.support.fakes import FakeClock


class Table:
    """Stands in for the delayed_event table: due times, and a record of the runs."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.due: list[int] = []
        self.runs: list[int] = []
        self.fail = False

    async def run_due(self) -> int:
        if self.fail:
            raise ConnectionError("database away")
        now = self.clock.now_ms()
        self.runs.append(now)
        ready = [d for d in self.due if d <= now]
        self.due = [d for d in self.due if d > now]
        return len(ready)

    async def next_due(self) -> int | None:
        return min(self.due) if self.due else None

    async def prune(self) -> int:
        return 0


def _scheduler(clock: FakeClock, table: Table) -> WakeUpScheduler:
    return WakeUpScheduler(
        wakeup=WakeUp(),
        run_due=table.run_due,
        next_due=table.next_due,
        prune=table.prune,
        clock=clock,
        sweep_seconds=15,
        prune_seconds=600,
    )


def _job_time(scheduler: WakeUpScheduler) -> int | None:
    job = scheduler._scheduler.get_job(WAKE_JOB)
    if job is None:
        return None
    return int(job.next_run_time.timestamp() * 1000)


async def test_start_wakes_at_once_for_overdue_events() -> None:
    clock = FakeClock()
    scheduler = _scheduler(clock, Table(clock))
    scheduler.wake(clock.now_ms() + 50_000)  # set before start; start still wakes now
    scheduler.start()
    try:
        assert scheduler.wake_at == clock.now_ms()
        assert scheduler.running
    finally:
        scheduler.shutdown()
    await asyncio.sleep(0)  # the shutdown runs on the event loop
    assert not scheduler.running


async def test_only_an_earlier_time_moves_the_wake_up() -> None:
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    scheduler = _scheduler(clock, Table(clock))
    scheduler.start()
    try:
        await scheduler.tick()  # the start-up run; nothing due
        scheduler.wake(clock.now_ms() + 10_000)
        assert _job_time(scheduler) == clock.now_ms() + 10_000
        scheduler.wake(clock.now_ms() + 20_000)
        assert _job_time(scheduler) == clock.now_ms() + 10_000
        scheduler.wake(clock.now_ms() + 5_000)
        assert _job_time(scheduler) == clock.now_ms() + 5_000
        assert scheduler.wake_at == clock.now_ms() + 5_000
    finally:
        scheduler.shutdown()


async def test_tick_replays_then_sets_the_next_wake_up() -> None:
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    table = Table(clock)
    table.due = [clock.now_ms() + 1_000, clock.now_ms() + 7_000]
    scheduler = _scheduler(clock, table)
    scheduler.start()
    try:
        clock.advance(1_000)
        await scheduler.tick()
        assert table.runs[-1] == clock.now_ms()
        assert table.due == [clock.now_ms() + 6_000]
        assert scheduler.wake_at == clock.now_ms() + 6_000
        assert _job_time(scheduler) == clock.now_ms() + 6_000
    finally:
        scheduler.shutdown()


async def test_a_failed_run_leaves_the_sweep_to_try_again() -> None:
    clock = FakeClock()
    table = Table(clock)
    table.fail = True
    scheduler = _scheduler(clock, table)
    scheduler.start()
    try:
        await scheduler.tick()  # does not raise
        assert scheduler._scheduler.get_job("sweep") is not None
    finally:
        scheduler.shutdown()


async def test_no_job_per_event() -> None:
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    scheduler = _scheduler(clock, Table(clock))
    scheduler.start()
    try:
        for offset in range(1_000, 0, -1):
            scheduler.wake(clock.now_ms() + offset * 1000)
        ids = sorted(job.id for job in scheduler._scheduler.get_jobs())
        assert ids == ["prune", "sweep", WAKE_JOB]
    finally:
        scheduler.shutdown()


async def test_a_tick_during_a_run_only_pokes_it() -> None:
    """A wake-up while a run is going on leaves the wake-ups to that run: asking for the next due
    time then could find events the run is about to claim, and wake again at once, in a loop."""
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    table = Table(clock)
    asked: list[int] = []

    async def poked() -> int | None:
        return None

    async def next_due() -> int | None:
        asked.append(clock.now_ms())
        return clock.now_ms()

    scheduler = WakeUpScheduler(
        wakeup=WakeUp(),
        run_due=poked,
        next_due=next_due,
        prune=table.prune,
        clock=clock,
        sweep_seconds=15,
        prune_seconds=600,
    )
    scheduler.start()
    try:
        await scheduler.tick()
        assert asked == []
        assert scheduler.wake_at is None
    finally:
        scheduler.shutdown()


async def test_wake_ups_are_not_refused_while_one_runs() -> None:
    """The wake job may fire again while an earlier wake-up's long run goes on."""
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    scheduler = _scheduler(clock, Table(clock))
    scheduler.start()
    try:
        scheduler.wake(clock.now_ms() + 1_000)
        job = scheduler._scheduler.get_job(WAKE_JOB)
        assert job is not None
        assert job.max_instances > 1
    finally:
        scheduler.shutdown()


async def test_an_event_the_run_could_not_claim_is_tried_again_after_a_pause() -> None:
    """The run claimed nothing, yet the event it was woken for is due still (its row locked by
    another transaction): the next try waits `RETRY_PASSED_OVER_MS`, it does not spin."""
    clock = FakeClock(start_ms=int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000))
    due = clock.now_ms() - 500

    async def nothing_claimed() -> int | None:
        return 0

    async def next_due() -> int | None:
        return due

    scheduler = WakeUpScheduler(
        wakeup=WakeUp(),
        run_due=nothing_claimed,
        next_due=next_due,
        prune=Table(clock).prune,
        clock=clock,
        sweep_seconds=15,
        prune_seconds=600,
    )
    scheduler.start()
    try:
        await scheduler.tick()
        assert scheduler.wake_at == clock.now_ms() + RETRY_PASSED_OVER_MS
        assert _job_time(scheduler) == clock.now_ms() + RETRY_PASSED_OVER_MS
    finally:
        scheduler.shutdown()


def test_an_event_fallen_due_since_the_claim_is_claimed_at_once() -> None:
    assert wake_up_time(next_due=1_050, claimed_at=1_000, now=1_060) == 1_050
    assert wake_up_time(next_due=1_000, claimed_at=1_000, now=1_060) == 1_060 + RETRY_PASSED_OVER_MS
    assert wake_up_time(next_due=5_000, claimed_at=1_000, now=1_060) == 5_000
