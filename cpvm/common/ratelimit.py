"""Pure rate limiting with an injected clock: per-key token buckets and a log throttle.

Nothing here does I/O or reads the wall clock: every object takes a ``clock`` with a
``seconds()`` method (the reactor in production, ``twisted.internet.task.Clock`` in tests).
"""

from __future__ import annotations

from typing import Protocol


class SecondsClock(Protocol):
    """Anything with ``seconds()``: a reactor or ``twisted.internet.task.Clock``."""

    def seconds(self) -> float: ...


class TokenBuckets:
    """One token bucket per key (a client address): ``burst`` tokens, refilled at ``rate``
    per second. ``take`` spends one token when there is one; ``give_back`` returns it.

    A bucket that has refilled completely holds no information, so it is forgotten; the
    table is pruned of such buckets when it grows past ``max_keys``, and if a flood from
    many addresses keeps it full the oldest entry goes (bounded memory either way).
    """

    def __init__(self, clock: SecondsClock, *, burst: float, rate: float, max_keys: int = 100_000):
        if burst < 1 or rate <= 0:
            raise ValueError("burst must be at least 1 and rate positive")
        self._clock = clock
        self.burst = float(burst)
        self.rate = float(rate)
        self._max_keys = max_keys
        # key -> (tokens at the time of the last update, that time)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _level(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, then = entry
        return min(self.burst, tokens + max(0.0, now - then) * self.rate)

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
        full = [k for k in self._buckets if self._level(k, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) >= self._max_keys:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)


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
