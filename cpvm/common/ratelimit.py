"""Pure rate limiting with an injected clock: per-key token buckets and a log throttle.

Nothing here does I/O or reads the wall clock: every object takes a ``clock`` with a
``seconds()`` method (the reactor in production, ``twisted.internet.task.Clock`` in tests).

- ``TokenBuckets``: cpvm's failed-redemption budget per client address (spend, give back).
- ``KeyedRateLimiter``: the manager's ``createConsoleEndpoint`` limit per API key (take,
  or the wait until the next call would be admitted).
- ``LogThrottle``: one log line per interval for a flood of one kind of event.

Both bucket tables hold at most ``burst`` tokens per key, refilled at ``rate`` per second.
"""

from __future__ import annotations

from typing import Protocol


class SecondsClock(Protocol):
    """Anything with ``seconds()``: a reactor or ``twisted.internet.task.Clock``."""

    def seconds(self) -> float: ...


# KeyedRateLimiter keeps buckets per authenticated API key, so their number is bounded by the
# keys in the database; past this many, full buckets (which carry no state) are dropped.
_PRUNE_ABOVE = 1024


class _BucketTable:
    """A token bucket per key: ``burst`` tokens, refilled at ``rate`` per second."""

    def __init__(self, clock: SecondsClock, burst: float, rate: float):
        self._clock = clock
        self.burst = float(burst)
        self.rate = float(rate)
        # key -> (tokens at the time of the last update, that time)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, then = entry
        # A clock that steps back must not drain the bucket.
        return min(self.burst, tokens + max(0.0, now - then) * self.rate)

    def _full_keys(self, now: float) -> list[str]:
        return [k for k in self._buckets if self._level(k, now) >= self.burst]

    def __len__(self) -> int:
        return len(self._buckets)


class TokenBuckets(_BucketTable):
    """One token bucket per key (a client address): ``burst`` tokens, refilled at ``rate``
    per second. ``take`` spends one token when there is one; ``give_back`` returns it.

    A bucket that has refilled completely holds no information, so it is forgotten; the
    table is pruned of such buckets when it grows past ``max_keys``, and if a flood from
    many addresses keeps it full the oldest entry goes (bounded memory either way).
    """

    def __init__(self, clock: SecondsClock, *, burst: float, rate: float, max_keys: int = 100_000):
        if burst < 1 or rate <= 0:
            raise ValueError("burst must be at least 1 and rate positive")
        super().__init__(clock, burst, rate)
        self._max_keys = max_keys

    def available(self, key: str) -> float:
        """How many tokens ``key`` has now (for tests and metrics)."""
        return self._level(key, self._clock.seconds())

    def take(self, key: str) -> bool:
        """Spend one of ``key``'s tokens; ``False`` (and nothing spent) when it has none."""
        now = self._clock.seconds()
        level = self._level(key, now)
        if level < 1.0:
            return False
        self._store(key, level - 1.0, now)
        return True

    def give_back(self, key: str) -> None:
        """Return a token spent by ``take`` (the attempt turned out well)."""
        now = self._clock.seconds()
        level = min(self.burst, self._level(key, now) + 1.0)
        if level >= self.burst:
            self._buckets.pop(key, None)
        else:
            self._store(key, level, now)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets.pop(key, None)  # re-insert: dict order is then least recently used
        if len(self._buckets) >= self._max_keys:
            self._prune(now)
        self._buckets[key] = (tokens, now)

    def _prune(self, now: float) -> None:
        for k in self._full_keys(now):
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:
            del self._buckets[next(iter(self._buckets))]


class KeyedRateLimiter(_BucketTable):
    """``take(key)`` returns 0.0 when a call for ``key`` is admitted, else the seconds until
    the next one would be. A limiter with ``rate == 0`` admits everything."""

    def __init__(self, rate: float, burst: int, clock: SecondsClock):
        super().__init__(clock, burst, rate)
        self._prune_above = _PRUNE_ABOVE

    @property
    def enabled(self) -> bool:
        """False when ``rate`` is 0 (no limit)."""
        return self.rate > 0

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
        for key in self._full_keys(now):
            del self._buckets[key]
        # Amortised: with many busy keys, the next sweep waits until their number doubles.
        self._prune_above = max(_PRUNE_ABOVE, 2 * len(self._buckets))


class LogThrottle:
    """At most one log line per ``interval`` seconds for each kind of event.

    ``event(kind)`` answers ``None`` while the line must stay quiet, or the number of
    events of that kind since the last line (this one included) when one may be written:
    a flood costs one line per interval saying how many it stood for.
    """

    def __init__(self, clock: SecondsClock, interval: float = 10.0):
        self._clock = clock
        self.interval = interval
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def event(self, kind: str) -> int | None:
        now = self._clock.seconds()
        self._count[kind] = self._count.get(kind, 0) + 1
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            return None
        self._last[kind] = now
        return self._count.pop(kind)
