"""Recording as the session registry sees it: which sessions get a recorder, what a failed
recording does to its session (``[recording] on_failure``), and the end report that waits
for the file's summary.

The registry calls :meth:`SessionRecordings.attach` when a session is redeemed and
:meth:`SessionRecordings.end_report` when it ends; the heartbeat takes the deletions of
the retention from here and waits for :meth:`settled` before its last beat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from cpvm.common.contract import Outcome
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.recording.recorder import RecordingSummary
from cpvm.proxy.recording.service import Recordings

if TYPE_CHECKING:  # pragma: no cover
    from cpvm.proxy.session import ConsoleSession

audit_log = Logger(namespace="cpvm.audit")


class SessionRecordings:
    """The glue between console sessions and this process's :class:`Recordings`."""

    _log = Logger()

    def __init__(self, recordings: Recordings, reactor, metrics: ProxyMetrics | None = None):
        self.recordings = recordings
        self._reactor = reactor
        self._metrics = metrics
        self._finishing: set[Deferred] = set()

    def attach(self, session: ConsoleSession) -> None:
        """Give a redeemed session a recorder if the manager said to record it."""
        r = session.redemption
        if r is None or not r.recording:
            return
        session.recorder = self.recordings.recorder(
            r.session_id, lambda reason: self._failed(session, reason), part=r.reconnects
        )

    def _failed(self, session: ConsoleSession, reason: str) -> None:
        if self.recordings.settings.on_failure == "end":
            # The console does not go on unrecorded (docs/recording.md).
            session.close(Outcome.RECORDING_FAILED, f"recording failed: {reason}")
            return
        self._log.warn(
            "recording incomplete, the session goes on ([recording] on_failure = continue): "
            "{reason}",
            reason=reason,
            **session.log_fields(),
        )

    def end_report(
        self, session: ConsoleSession, report: dict, queue: Callable[[dict], None]
    ) -> None:
        """Queue a session's end report, with its recording's summary once on disk."""
        rec = session.recorder
        session.recorder = None
        if rec is None:
            queue(report)
            return
        if not rec.started:  # ended before the relay: nothing was shown, no file
            self.recordings.abandon(rec)
            queue(report)
            return
        d = self.recordings.finish(rec, session.stats.ended or self._reactor.seconds())
        self._finishing.add(d)
        fields = session.log_fields()

        def summarised(summary: RecordingSummary) -> None:
            audit_log.info(
                "console session recording closed: {size} bytes, {duration:.1f} s, "
                "sha256 {sha256}" + ("" if summary.complete else ", incomplete: {error}"),
                event="recorded",
                size=summary.size,
                duration=summary.duration,
                sha256=summary.sha256,
                complete=summary.complete,
                error=summary.error,
                **fields,
            )
            if self._metrics is not None:
                result = "complete" if summary.complete else "incomplete"
                self._metrics.recordings.labels(result=result).inc()
                self._metrics.recorded_bytes.inc(summary.size)
            queue({**report, "recording": summary.report()})

        def failed(failure) -> None:
            self._log.failure("recording could not be closed", failure, **fields)
            queue(report)

        d.addCallbacks(summarised, failed)
        d.addBoth(lambda _: self._finishing.discard(d))

    def settled(self) -> Deferred:
        """Fires when every ended session's recording is on disk and its report queued."""
        if not self._finishing:
            return succeed(None)
        return DeferredList(list(self._finishing), consumeErrors=True)

    def take_deleted(self) -> list[str]:
        """Recordings the retention deleted, for the next heartbeat."""
        return self.recordings.take_deleted()

    def give_back_deleted(self, session_ids: list[str]) -> None:
        self.recordings.give_back_deleted(session_ids)


class NoRecordings:
    """The registry's recordings when there are none (tests, tools): nothing is recorded,
    reports go out at once."""

    def attach(self, session: ConsoleSession) -> None:
        """Nothing to attach."""

    def end_report(
        self, session: ConsoleSession, report: dict, queue: Callable[[dict], None]
    ) -> None:
        """The report, as it is."""
        queue(report)

    def settled(self) -> Deferred:
        """Nothing is ever being closed."""
        return succeed(None)

    def take_deleted(self) -> list[str]:
        """Nothing was deleted."""
        return []

    def give_back_deleted(self, session_ids: list[str]) -> None:
        """Nothing to keep."""


NO_RECORDINGS = NoRecordings()
