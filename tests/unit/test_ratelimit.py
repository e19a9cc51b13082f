"""Token buckets, the manager's per-key limiter and the log throttle (cpvm.common.ratelimit),
with an injected Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cpvm.common import ratelimit
from cpvm.common.ratelimit import KeyedRateLimiter, LogThrottle, TokenBuckets


def test_bucket_allows_a_burst_then_the_rate():
    clock = Clock()
    buckets = TokenBuckets(clock, burst=3, rate=0.5)
    assert [buckets.take("a") for _ in range(4)] == [True, True, True, False]
    clock.advance(1.9)
    assert not buckets.take("a")
    clock.advance(0.1)  # 2 s at 0.5/s: one token
    assert buckets.take("a")
    assert not buckets.take("a")


def test_buckets_are_per_key():
    clock = Clock()
    buckets = TokenBuckets(clock, burst=1, rate=0.1)
    assert buckets.take("a")
    assert not buckets.take("a")
    assert buckets.take("b")


def test_give_back_refunds_and_never_exceeds_the_burst():
    clock = Clock()
    buckets = TokenBuckets(clock, burst=2, rate=1)
    assert buckets.take("a")
    buckets.give_back("a")
    buckets.give_back("a")
    assert buckets.available("a") == 2
    assert len(buckets) == 0  # a full bucket is forgotten


def test_table_is_bounded():
    clock = Clock()
    buckets = TokenBuckets(clock, burst=1, rate=0.001, max_keys=100)
    for i in range(1000):
        assert buckets.take(f"10.0.{i // 256}.{i % 256}")
    assert len(buckets) <= 100


def test_bad_parameters():
    with pytest.raises(ValueError):
        TokenBuckets(Clock(), burst=0, rate=1)
    with pytest.raises(ValueError):
        TokenBuckets(Clock(), burst=1, rate=0)


def test_log_throttle_counts_what_it_suppressed():
    clock = Clock()
    throttle = LogThrottle(clock, interval=10)
    assert throttle.event("x") == 1
    assert [throttle.event("x") for _ in range(5)] == [None] * 5
    assert throttle.event("y") == 1
    clock.advance(10)
    assert throttle.event("x") == 6


# -- KeyedRateLimiter (the manager's createConsoleEndpoint limit per API key)


def test_keyed_limiter_burst_then_rate():
    clock = Clock()
    limiter = KeyedRateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("a") == 0.5  # one token comes back every 0.5 s
    assert limiter.take("b") == 0.0  # another key has its own bucket
    clock.advance(0.25)
    assert limiter.take("a") == 0.25
    clock.advance(0.25)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0
    clock.advance(100)  # refills to the burst, not beyond
    assert [limiter.take("a") for _ in range(4)][-1] > 0


def test_keyed_limiter_refused_calls_do_not_cost_tokens():
    clock = Clock()
    limiter = KeyedRateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.take("a") == 0.0
    for _ in range(100):
        assert limiter.take("a") > 0
    clock.advance(1.0)
    assert limiter.take("a") == 0.0


def test_keyed_limiter_rate_zero_is_off():
    limiter = KeyedRateLimiter(rate=0, burst=1, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.take("a") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_keyed_limiter_clock_stepping_back_does_not_drain():
    clock = Clock()
    clock.advance(1000)
    limiter = KeyedRateLimiter(rate=1.0, burst=2, clock=clock)
    assert limiter.take("a") == 0.0
    clock.rightNow = 10.0
    assert limiter.take("a") == 0.0


def test_keyed_limiter_full_buckets_are_pruned(monkeypatch):
    monkeypatch.setattr(ratelimit, "_PRUNE_ABOVE", 10)
    clock = Clock()
    limiter = KeyedRateLimiter(rate=1.0, burst=1, clock=clock)
    for i in range(10):
        limiter.take(f"k{i}")
    clock.advance(5)  # every bucket full again
    limiter.take("new")
    assert len(limiter) <= 2
