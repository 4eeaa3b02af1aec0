"""Book-keeping for the fault tests: what each test did to each delayed event, what it may
therefore see arrive at the homeserver, and the figures of the run."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.faults.homeserver import Event

# How much slower than the machine measured at the start of a test the rest of it may run before
# a planned send time is missed: the margins of planned schedules are this many times what the
# measured pace needs.
PACE_HEADROOM = 4.0
# The least time left before a planned send time when its event is scheduled.
MIN_LEAD_MS = 200

# Arrival times come from the same machine's clock as the requests; this covers rounding of the
# sidecar's millisecond timestamps.
CLOCK_TOLERANCE = 0.05

KNOWN = "known"
UNKNOWN = "unknown"  # the request got no answer: it may or may not have taken effect


@dataclass
class Entry:
    seq: int
    delay_ms: int
    delay_id: str | None = None
    scheduled: str = KNOWN
    cancelled: str | None = None  # KNOWN: cancel answered 200; UNKNOWN: no answer
    sent: bool = False  # an action answered that it was already sent
    not_before: float = 0.0  # no arrival before this wall-clock time
    send_after: float = 0.0  # the latest known start of its delay period plus the delay
    restarts: int = 0

    def allowed(self) -> set[int]:
        """How many arrivals are right for this event."""
        if self.cancelled == KNOWN:
            return {0}
        if self.scheduled == UNKNOWN or self.cancelled == UNKNOWN:
            return {0, 1}
        return {1}


@dataclass
class Verdict:
    events: int = 0
    delivered: int = 0
    cancelled: int = 0
    uncertain: int = 0
    lost: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    cancelled_but_sent: list[int] = field(default_factory=list)
    early: list[tuple[int, float]] = field(default_factory=list)
    strangers: list[Any] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.duplicated or self.cancelled_but_sent or self.early or self.strangers
        )

    def describe(self) -> str:
        return (
            f"lost={self.lost} duplicated={self.duplicated} "
            f"cancelled_but_sent={self.cancelled_but_sent} early(seq, seconds)={self.early} "
            f"unknown arrivals={self.strangers}"
        )


class Ledger:
    def __init__(self) -> None:
        self.entries: dict[int, Entry] = {}
        self._next = 0

    def new(self, delay_ms: int) -> Entry:
        self._next += 1
        entry = Entry(seq=self._next, delay_ms=delay_ms)
        self.entries[entry.seq] = entry
        return entry

    def judge(self, arrivals: dict[Any, list[Event]]) -> Verdict:
        verdict = Verdict(events=len(self.entries))
        verdict.strangers = [seq for seq in arrivals if seq not in self.entries]
        for seq, entry in self.entries.items():
            got = arrivals.get(seq, [])
            allowed = entry.allowed()
            if len(allowed) > 1:
                verdict.uncertain += 1
            if len(got) > 1:
                verdict.duplicated.append(seq)
            elif not got and allowed == {1}:
                verdict.lost.append(seq)
            elif got and allowed == {0}:
                verdict.cancelled_but_sent.append(seq)
            if got:
                verdict.delivered += 1
                early = entry.not_before - CLOCK_TOLERANCE - got[0].arrived
                if early > 0:
                    verdict.early.append((seq, round(early, 3)))
            elif entry.cancelled is not None:
                verdict.cancelled += 1
        return verdict


def delay_until(target: float, what: str = "a planned send time") -> int:
    """The delay (ms) that makes an event scheduled now due at wall-clock `target`, from one
    clock read. A target that has passed (or nearly) is an error in the test's set-up, reported
    as such, never a negative or zero delay sent to the sidecar."""
    delay_ms = int((target - time.time()) * 1000)
    if delay_ms < MIN_LEAD_MS:
        pytest.fail(
            f"test set-up: {what} was {-delay_ms / 1000:.2f} s ago (less than "
            f"{MIN_LEAD_MS} ms ahead) when its event was scheduled; the machine ran more than "
            f"{PACE_HEADROOM:.0f} times slower than the pace measured at the start",
            pytrace=False,
        )
    return delay_ms


def lead_time(seconds_per_request: float, requests: int, floor: float = 1.0) -> float:
    """How far ahead to plan send times so that `requests` more requests at the measured pace fit
    before the first one, PACE_HEADROOM times over."""
    return floor + PACE_HEADROOM * seconds_per_request * requests


def say(text: str) -> None:
    """A line for the run's output (shown with `-s`, and with a failing test's report)."""
    sys.stdout.write("\n" + text + "\n")


class Figures:
    """One row per test: what it put the sidecar through and what came out."""

    COLUMNS = (
        "test",
        "events",
        "delivered",
        "cancelled",
        "sidecar_kills",
        "mid_replay_kills",
        "replicas",
        "outages",
        "lost",
        "duplicated",
        "seconds",
    )

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, test: str, started: float, verdict: Verdict | None = None, **values: Any) -> None:
        row: dict[str, Any] = dict.fromkeys(self.COLUMNS, 0)
        row["test"] = test
        if verdict is not None:
            row.update(
                events=verdict.events,
                delivered=verdict.delivered,
                cancelled=verdict.cancelled,
                lost=len(verdict.lost),
                duplicated=len(verdict.duplicated),
            )
        row.update(values)
        row["seconds"] = round(time.monotonic() - started, 1)
        self.rows.append(row)
        say(self.table([row]))

    def table(self, rows: list[dict[str, Any]] | None = None) -> str:
        rows = self.rows if rows is None else rows
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in self.COLUMNS}
        lines = [" | ".join(c.ljust(widths[c]) for c in self.COLUMNS)]
        lines.append("-+-".join("-" * widths[c] for c in self.COLUMNS))
        for row in rows:
            lines.append(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in self.COLUMNS))
        if rows is self.rows and len(rows) > 1:
            total = {c: sum(int(r.get(c, 0)) for r in rows) for c in self.COLUMNS[1:-1]}
            seconds = round(sum(float(r["seconds"]) for r in rows), 1)
            lines.append(
                " | ".join(
                    str({"test": "total", **total, "seconds": seconds}[c]).ljust(widths[c])
                    for c in self.COLUMNS
                )
            )
        return "\n".join(lines)


FIGURES = Figures()
