"""Token buckets and the log throttle (cpvm.common.ratelimit) with an injected Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cpvm.common.ratelimit import LogThrottle, TokenBuckets


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
