"""Token buckets per key (the manager limits ``createConsoleEndpoint`` per API key).

Pure logic on an injected clock (anything with ``seconds()``: the reactor, or ``Clock`` in
tests). A bucket holds at most ``burst`` tokens and refills at ``rate`` per second; a call
takes one. A limiter with ``rate == 0`` admits everything.
"""

from __future__ import annotations

from typing import Any

# Buckets are kept per authenticated API key, so their number is bounded by the keys in
# the database; past this many, full buckets (which carry no state) are dropped.
_PRUNE_ABOVE = 1024


class KeyedRateLimiter:
    """``take(key)`` returns 0.0 when a call for ``key`` is admitted, else the seconds until
    the next one would be."""

    def __init__(self, rate: float, burst: int, clock: Any):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        # key -> (tokens left, time they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_above = _PRUNE_ABOVE

    @property
    def enabled(self) -> bool:
        """False when ``rate`` is 0 (no limit)."""
        return self.rate > 0

    def _level(self, key: str, now: float) -> float:
        tokens, stamp = self._buckets.get(key, (self.burst, now))
        # A clock that steps back must not drain the bucket.
        return min(self.burst, tokens + max(0.0, now - stamp) * self.rate)

    def take(self, key: str) -> float:
        """Take one token for ``key``; 0.0 if it was there, else the wait for one."""
        if not self.enabled:
            return 0.0
        now = self._clock.seconds()
        tokens = self._level(key, now)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._prune_above:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        # Amortised: with many busy keys, the next sweep waits until their number doubles.
        self._prune_above = max(_PRUNE_ABOVE, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)


__all__ = ["KeyedRateLimiter"]
