from __future__ import annotations

import pytest

from app.errors import LimitExceeded
from app.ratelimit import RateLimits, TokenBuckets


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_burst_then_refill_at_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=3, now=clock)
    assert [buckets.wait_seconds("k") for _ in range(3)] == [0, 0, 0]
    assert buckets.wait_seconds("k") == pytest.approx(0.5)
    clock.t += 0.5
    assert buckets.wait_seconds("k") == 0
    assert buckets.wait_seconds("k") > 0


def test_keys_are_independent() -> None:
    buckets = TokenBuckets(rate=1, burst=1, now=Clock())
    assert buckets.wait_seconds("a") == 0
    assert buckets.wait_seconds("a") > 0
    assert buckets.wait_seconds("b") == 0


def test_zero_rate_turns_it_off() -> None:
    buckets = TokenBuckets(rate=0, burst=1, now=Clock())
    assert all(buckets.wait_seconds("k") == 0 for _ in range(1000))


def test_memory_is_bounded() -> None:
    buckets = TokenBuckets(rate=1, burst=1, now=Clock(), max_keys=10)
    for n in range(1000):
        buckets.wait_seconds(str(n))
    assert len(buckets._buckets) == 10


def test_limit_exceeded_carries_retry_after() -> None:
    clock = Clock()
    limits = RateLimits(
        schedule=TokenBuckets(rate=0.4, burst=1, now=clock),
        manage=TokenBuckets(rate=1, burst=1, now=clock),
        tokenless=TokenBuckets(rate=1, burst=1, now=clock),
        untagged=TokenBuckets(rate=1, burst=1, now=clock),
    )
    limits.schedule("@a:b")
    with pytest.raises(LimitExceeded) as raised:
        limits.schedule("@a:b")
    assert raised.value.status == 429
    assert raised.value.extra["retry_after_ms"] == 2500
    assert raised.value.headers["Retry-After"] == "3"


def test_tokenless_calls_are_limited_per_delay_id_not_per_caller() -> None:
    clock = Clock()
    limits = RateLimits(
        schedule=TokenBuckets(rate=1, burst=1, now=clock),
        manage=TokenBuckets(rate=1, burst=1, now=clock),
        tokenless=TokenBuckets(rate=1, burst=1, now=clock),
        untagged=TokenBuckets(rate=1, burst=1, now=clock),
    )
    for n in range(100):
        limits.manage(None, f"delay{n}")  # one SFU host, many participants
    with pytest.raises(LimitExceeded):
        limits.manage(None, "delay0")
    limits.manage("@a:b", "delay0")  # a token uses the user's own bucket


def test_seconds_until_free_takes_nothing() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=1, now=clock)
    assert [buckets.seconds_until_free("k") for _ in range(5)] == [0] * 5
    assert buckets.wait_seconds("k") == 0
    assert buckets.seconds_until_free("k") == pytest.approx(0.5)
    assert buckets.seconds_until_free("k") == pytest.approx(0.5)
    clock.t += 0.5
    assert buckets.seconds_until_free("k") == 0
    assert buckets.wait_seconds("k") == 0


def test_the_untagged_refusal_matches_the_limit_and_spends_nothing() -> None:
    clock = Clock()
    limits = RateLimits(
        schedule=TokenBuckets(rate=1, burst=1, now=clock),
        manage=TokenBuckets(rate=1, burst=1, now=clock),
        tokenless=TokenBuckets(rate=1, burst=5, now=clock),
        untagged=TokenBuckets(rate=4, burst=2, now=clock),
    )
    assert limits.untagged_refusal() is None
    limits.manage(None, "a", untagged=True)
    limits.manage(None, "b", untagged=True)
    refusal = limits.untagged_refusal()
    assert refusal is not None
    with pytest.raises(LimitExceeded) as raised:
        limits.manage(None, "c", untagged=True)
    assert (refusal.status, refusal.body(), refusal.headers) == (
        raised.value.status,
        raised.value.body(),
        raised.value.headers,
    )
    clock.t += 0.25
    assert limits.untagged_refusal() is None
