"""The per-key token bucket, on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from cpvm.manager import ratelimit
from cpvm.manager.ratelimit import KeyedRateLimiter


def test_burst_then_rate():
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


def test_refused_calls_do_not_cost_tokens():
    clock = Clock()
    limiter = KeyedRateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.take("a") == 0.0
    for _ in range(100):
        assert limiter.take("a") > 0
    clock.advance(1.0)
    assert limiter.take("a") == 0.0


def test_rate_zero_is_off():
    limiter = KeyedRateLimiter(rate=0, burst=1, clock=Clock())
    assert not limiter.enabled
    assert all(limiter.take("a") == 0.0 for _ in range(1000))
    assert len(limiter) == 0


def test_clock_stepping_back_does_not_drain():
    clock = Clock()
    clock.advance(1000)
    limiter = KeyedRateLimiter(rate=1.0, burst=2, clock=clock)
    assert limiter.take("a") == 0.0
    clock.rightNow = 10.0
    assert limiter.take("a") == 0.0


def test_full_buckets_are_pruned(monkeypatch):
    monkeypatch.setattr(ratelimit, "_PRUNE_ABOVE", 10)
    clock = Clock()
    limiter = KeyedRateLimiter(rate=1.0, burst=1, clock=clock)
    for i in range(10):
        limiter.take(f"k{i}")
    clock.advance(5)  # every bucket full again
    limiter.take("new")
    assert len(limiter) <= 2
