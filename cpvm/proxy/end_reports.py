"""End reports waiting for the next heartbeat (:mod:`cpvm.proxy.heartbeat`), which carries
them in one request.

Bounded for a manager that stays away (the oldest are dropped, with a warning). An
unclean end (``cpvm.common.contract.is_unclean_end``) calls :attr:`EndReports.on_unclean`
at once: the same browser may resume such a session only once the manager has recorded
its end, so the wiring has the heartbeat beat now (``Heartbeat.soon``) rather than at
the interval.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.logger import Logger

from cpvm.common.contract import is_unclean_end

# Up to this many end reports ride on one heartbeat; the queue holds at most
# MAX_QUEUED_ENDS.
ENDS_PER_HEARTBEAT = 500
MAX_QUEUED_ENDS = 100_000


class EndReports:
    """The queue of end reports of one process's redeemed sessions."""

    _log = Logger(namespace="cpvm.proxy.registry")

    def __init__(self) -> None:
        self._queue: deque[dict] = deque()
        self.on_unclean: Callable[[], None] = lambda: None

    def add(self, session_id: str, reconnects: int, report: dict) -> None:
        """Queue ``report`` for the session's ``reconnects``-th connection (0: its first;
        the manager ignores a late report of an earlier one)."""
        if len(self._queue) >= MAX_QUEUED_ENDS:
            dropped = self._queue.popleft()
            self._log.warn(
                "manager unreachable for long: dropped the end report of session {session}",
                session=dropped["session_id"],
            )
        self._queue.append({"session_id": session_id, **report, "reconnects": reconnects})
        if is_unclean_end(report["reason"]):
            self.on_unclean()

    def take(self, limit: int = ENDS_PER_HEARTBEAT) -> list[dict]:
        """Reports for the next heartbeat (give them back if it fails)."""
        return [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]

    def give_back(self, reports: list[dict]) -> None:
        """A failed heartbeat's reports, first in line again."""
        self._queue.extendleft(reversed(reports))

    def __len__(self) -> int:
        return len(self._queue)
