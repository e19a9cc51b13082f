"""This process's recordings: the directory, the drain thread, the retention, and what the
next heartbeat must tell the manager (recordings deleted).

The session registry asks :meth:`Recordings.recorder` for a :class:`SessionRecorder` when
the manager says a session is to be recorded and hands it back through :meth:`finish`
when the session ends; stopping the service waits for every file to be fsync-ed.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger

from cpvm.proxy.config import RecordingConfig
from cpvm.proxy.recording.recorder import RecordingSettings, SessionRecorder
from cpvm.proxy.recording.retention import RetentionService
from cpvm.proxy.recording.writer import DrainThread, InlineDrain, on_thread

# Deletions the manager has not heard of yet: bounded like the end reports.
MAX_QUEUED_DELETIONS = 10_000


class Recordings(MultiService):
    """Owns the recording directory of this cpvm process."""

    _log = Logger()

    def __init__(
        self,
        *,
        reactor,
        settings: RecordingSettings,
        retention_days: float,
        max_bytes: int,
        drain: DrainThread | InlineDrain | None = None,
        run_in_thread: Callable[..., Deferred] | None = None,
        retention_interval: float = 60.0,
    ):
        super().__init__()
        self._reactor = reactor
        self.settings = settings
        self._drain = drain or DrainThread()
        self._active: dict[str, SessionRecorder] = {}
        self._finishing: set[Deferred] = set()
        self._deleted: list[str] = []
        self.retention = RetentionService(
            reactor=reactor,
            directory=settings.directory,
            retention_days=retention_days,
            max_bytes=max_bytes,
            active=lambda: self._active.keys(),
            on_deleted=self._recording_deleted,
            interval=retention_interval,
            run_in_thread=run_in_thread
            or on_thread(self._drain, lambda *a: reactor.callFromThread(*a)),
        )
        self.retention.setServiceParent(self)

    def stopService(self):
        d = (
            DeferredList(list(self._finishing), consumeErrors=True)
            if self._finishing
            else succeed(None)
        )
        d.addCallback(lambda _: super(Recordings, self).stopService())
        # The drain thread stays (a daemon): sessions still open end after this and
        # their files are closed on it; the last heartbeat waits for them.
        return d

    @classmethod
    def from_config(cls, config: RecordingConfig, reactor) -> Recordings:
        """This process's recordings as ``[recording]`` says."""
        settings = RecordingSettings(
            directory=str(config.directory),
            record_input=config.record_input,
            on_failure="end" if config.on_failure == "end" else "continue",
            max_buffer=config.max_buffer,
        )
        return cls(
            reactor=reactor,
            settings=settings,
            retention_days=config.retention_days,
            max_bytes=config.max_bytes,
        )

    @property
    def active(self) -> int:
        """Recordings being written now."""
        return len(self._active)

    def recorder(
        self, session_id: str, on_failure: Callable[[str], None], part: int = 0
    ) -> SessionRecorder:
        """A recorder for a session the manager says to record (``part``: its reconnect
        count, for a resumed session)."""
        rec = SessionRecorder(
            settings=self.settings,
            session_id=session_id,
            part=part,
            drain=self._drain,
            call_from_thread=self._reactor.callFromThread,
            on_failure=on_failure,
        )
        self._active[session_id] = rec
        return rec

    def finish(self, rec: SessionRecorder, now: float) -> Deferred:
        """End a recording; fires with its :class:`RecordingSummary` once on disk."""
        d = rec.finish(now)
        self._finishing.add(d)

        def done(result):
            self._finishing.discard(d)
            self._active.pop(rec.session_id, None)
            return result

        d.addBoth(done)
        return d

    def abandon(self, rec: SessionRecorder) -> None:
        """A recorder that never started (the session ended before its relay)."""
        self._active.pop(rec.session_id, None)

    def _recording_deleted(self, session_id: str, reason: str) -> None:
        if len(self._deleted) >= MAX_QUEUED_DELETIONS:
            self._deleted.pop(0)
        self._deleted.append(session_id)

    def take_deleted(self, limit: int = 500) -> list[str]:
        """Deletions for the next heartbeat (give them back if it fails)."""
        taken, self._deleted = self._deleted[:limit], self._deleted[limit:]
        return taken

    def give_back_deleted(self, session_ids: list[str]) -> None:
        self._deleted[:0] = session_ids
