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


def untagged_limits(clock: Clock) -> RateLimits:
    return RateLimits(
        schedule=TokenBuckets(rate=1, burst=1, now=clock),
        manage=TokenBuckets(rate=1, burst=1, now=clock),
        tokenless=TokenBuckets(rate=1, burst=5, now=clock),
        untagged=TokenBuckets(rate=4, burst=2, now=clock),
    )


def test_only_misses_spend_the_untagged_budget() -> None:
    clock = Clock()  # never moves: nothing refills
    limits = untagged_limits(clock)
    for n in range(10):  # ten honoured calls on ten ids: each gives its token back
        limits.manage(None, f"honest{n}", untagged=True)
        limits.settle_untagged(f"honest{n}", honoured=True)
    for n in range(2):  # two misses spend the burst of two
        limits.manage(None, f"guess{n}", untagged=True)
        limits.settle_untagged(f"guess{n}", honoured=False)
    with pytest.raises(LimitExceeded):
        limits.manage(None, "guess2", untagged=True)


def test_lookups_in_flight_are_bounded_by_the_untagged_budget() -> None:
    limits = untagged_limits(Clock())
    limits.manage(None, "a", untagged=True)
    limits.manage(None, "b", untagged=True)  # two lookups under way, none answered yet
    assert limits.untagged_refusal("c") is not None
    with pytest.raises(LimitExceeded):
        limits.manage(None, "c", untagged=True)


def test_an_id_honoured_before_goes_on_while_guesses_keep_the_budget_empty() -> None:
    clock = Clock()
    limits = untagged_limits(clock)
    limits.manage(None, "honest", untagged=True)
    limits.settle_untagged("honest", honoured=True)
    for second in range(3):
        clock.t += 1  # the budget refills, and the guesses spend it again at once
        guesses = 0
        while limits.untagged_refusal() is None:
            limits.manage(None, f"guess{second}-{guesses}", untagged=True)
            limits.settle_untagged(f"guess{second}-{guesses}", honoured=False)
            guesses += 1
        assert guesses >= 1
        assert limits.untagged_refusal("honest") is None
        limits.manage(None, "honest", untagged=True)
        limits.settle_untagged("honest", honoured=True)
    # Once a call on it is not honoured (the event is gone), the id is charged again.
    limits.manage(None, "honest", untagged=True)
    limits.settle_untagged("honest", honoured=False)
    assert limits.untagged_refusal("honest") is not None
    with pytest.raises(LimitExceeded):
        limits.manage(None, "honest", untagged=True)


def test_known_untagged_ids_are_bounded() -> None:
    limits = RateLimits(
        schedule=TokenBuckets(rate=1, burst=1, now=Clock()),
        manage=TokenBuckets(rate=1, burst=1, now=Clock()),
        tokenless=TokenBuckets(rate=1, burst=5, now=Clock()),
        untagged=TokenBuckets(rate=1, burst=1, now=Clock()),
        max_known_untagged=3,
    )
    for n in range(10):
        limits.manage(None, f"id{n}", untagged=True)
        limits.settle_untagged(f"id{n}", honoured=True)
    limits.manage(None, "guess", untagged=True)
    limits.settle_untagged("guess", honoured=False)  # the budget of one is spent
    free = [limits.untagged_refusal(f"id{n}") is None for n in range(10)]
    assert free == [False] * 7 + [True] * 3
