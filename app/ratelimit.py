"""Rate limits: token buckets in memory, one per user (scheduling; management and lookups) and one
per delay_id for calls without a token. Never per IP address: one SFU host restarts the delayed
events of every participant it carries. Calls without a token on delay_ids without a tag (issued
before tags, `app.delay_ids`) also share one budget: random ids of that form would pass their own
buckets, and each costs a database call. Only guesses spend it: a call takes a token before its
lookup (so a flood gets no more lookups than the budget allows) and gives it back once the call
was honoured, and an id honoured once is remembered and never charged again, so a flood that keeps
the budget empty does not refuse the restarts of events that exist. Calls with a token never
touch that budget.

Each replica keeps its own buckets, so behind N replicas a client can reach up to N times a limit;
the per-user cap on scheduled events, kept in the database, is exact.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from app.errors import LimitExceeded


class TokenBuckets:
    """`rate` requests a second per key, in bursts of up to `burst`. A rate of 0 turns it off."""

    def __init__(
        self, rate: float, burst: int, now: Callable[[], float], max_keys: int = 100_000
    ) -> None:
        self.rate = rate
        self.burst = burst
        self._now = now
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait_seconds(self, key: str) -> float:
        """Take one token for `key`: 0 if there was one, else how long until there will be."""
        if self.rate <= 0:
            return 0.0
        now = self._now()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1 - tokens) / self.rate
        while len(self._buckets) > self._max_keys:
            # The least recently seen key goes; it would have refilled the longest anyway.
            self._buckets.popitem(last=False)
        return wait

    def seconds_until_free(self, key: str) -> float:
        """How long until `key` has a token, taking none: 0 if it has one now."""
        if self.rate <= 0:
            return 0.0
        now = self._now()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def give_back(self, key: str) -> None:
        """Return a token `wait_seconds` took for `key` (never beyond the burst)."""
        if self.rate <= 0 or key not in self._buckets:
            return
        tokens, last = self._buckets[key]
        self._buckets[key] = (min(float(self.burst), tokens + 1), last)


class RateLimits:
    def __init__(
        self,
        *,
        schedule: TokenBuckets,
        manage: TokenBuckets,
        tokenless: TokenBuckets,
        untagged: TokenBuckets,
        max_known_untagged: int = 100_000,
    ) -> None:
        self._schedule = schedule
        self._manage = manage
        self._tokenless = tokenless
        self._untagged = untagged
        # Untagged ids a call without a token was honoured on, most recently honoured last.
        self._known_untagged: OrderedDict[str, None] = OrderedDict()
        self._max_known_untagged = max_known_untagged
        # Untagged ids whose calls in flight took a token from the shared budget, and how many.
        self._charged: dict[str, int] = {}

    def schedule(self, user_id: str) -> None:
        _check(self._schedule, user_id)

    def manage(self, user_id: str | None, delay_id: str, *, untagged: bool = False) -> None:
        """Management and lookups: per user with a token, per delay_id without one; and, for a
        delay_id without a tag not honoured before, a token from the budget all of those share,
        held until `settle_untagged` says whether the call was honoured."""
        if user_id is not None:
            _check(self._manage, user_id)
            return
        charge = untagged and delay_id not in self._known_untagged
        if charge:
            wait = self._untagged.seconds_until_free("")
            if wait > 0:
                raise _refusal(wait)
        _check(self._tokenless, delay_id)
        if charge:
            self._untagged.wait_seconds("")
            self._charged[delay_id] = self._charged.get(delay_id, 0) + 1

    def settle_untagged(self, delay_id: str, *, honoured: bool) -> None:
        """After a call without a token that `manage` let through: an honoured call on an
        untagged id gives its token back and makes the id known (uncharged from then on); any
        other outcome keeps the token spent and forgets the id. Nothing for other ids."""
        count = self._charged.pop(delay_id, 0)
        if count > 1:
            self._charged[delay_id] = count - 1
        if not honoured:
            self._known_untagged.pop(delay_id, None)
            return
        if count:
            self._untagged.give_back("")
        elif delay_id not in self._known_untagged:
            return  # not an untagged id this sidecar charged or knows: a tagged one
        self._known_untagged[delay_id] = None
        self._known_untagged.move_to_end(delay_id)
        while len(self._known_untagged) > self._max_known_untagged:
            self._known_untagged.popitem(last=False)

    def untagged_refusal(self, delay_id: str | None = None) -> LimitExceeded | None:
        """What `manage` would refuse a call without a token on an untagged delay_id with right
        now because the shared budget is spent, spending nothing; None while it has room, or
        for an id already known (`settle_untagged`)."""
        if delay_id is not None and delay_id in self._known_untagged:
            return None
        wait = self._untagged.seconds_until_free("")
        return _refusal(wait) if wait > 0 else None


def _check(buckets: TokenBuckets, key: str) -> None:
    wait = buckets.wait_seconds(key)
    if wait > 0:
        raise _refusal(wait)


def _refusal(wait: float) -> LimitExceeded:
    return LimitExceeded(
        "Too many requests",
        extra={"retry_after_ms": math.ceil(wait * 1000)},
        headers={"Retry-After": str(math.ceil(wait))},
    )
