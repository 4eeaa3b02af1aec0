"""The one wake-up of a replica: when its replay run should next look at the table.

It is built first and handed to all that ask for a time (a schedule, a run that has nothing left
to claim, a retry, a send action) and to the scheduler, whose alarm clock it sets once started."""

from __future__ import annotations

from collections.abc import Callable

# How long to wait before claiming again when an event that was due at the last claim is still
# due after it: the claim passed it over (its row locked by another transaction, a restart or a
# cancel or another replica's claim on its way), and asking again at once would only spin.
RETRY_PASSED_OVER_MS = 100


def wake_up_time(next_due: int, claimed_at: int, now: int) -> int:
    """When to claim again for an event due at `next_due`, after a claim made at `claimed_at`
    that left it: at once if it fell due since, else `RETRY_PASSED_OVER_MS` from `now`."""
    if next_due <= claimed_at:
        return max(next_due, now + RETRY_PASSED_OVER_MS)
    return next_due


class WakeUp:
    """The earliest time asked for since the last wake-up. Before the clock starts, and once the
    replica is shutting down, asking sets no alarm."""

    def __init__(self) -> None:
        self.wake_at: int | None = None
        self._alarm: Callable[[int], None] | None = None
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wake(self, at_ms: int) -> None:
        """Make sure the replica wakes by `at_ms`; a later time than the one set is a no-op."""
        if self._stopped or (self.wake_at is not None and self.wake_at <= at_ms):
            return
        self.wake_at = at_ms
        if self._alarm is not None:
            self._alarm(at_ms)

    def start(self, alarm: Callable[[int], None], now_ms: int) -> None:
        """The clock runs: from now on each earlier time asked for sets `alarm`, and the first
        is now (overdue events are replayed at once)."""
        self._alarm = alarm
        self.wake_at = None
        self.wake(now_ms)

    def rung(self) -> None:
        """The alarm went off: the next time asked for sets it again, whatever it is."""
        self.wake_at = None

    def stop(self) -> None:
        """The replica is shutting down: no time asked for sets the alarm any more."""
        self._stopped = True
        self.wake_at = None
