"""Which recordings to delete, and the service that deletes them.

``[recording] retention_days`` and ``max_bytes`` apply per proxy (per recording
directory): first every recording older than ``retention_days`` goes, then, while the
directory holds more than ``max_bytes``, the oldest one. Oldest means the earliest last
write, i.e. the session that ended first. Recordings still being written are never
deleted (they are ``.part`` files until finished, so another worker process
sees them too). Each deletion is logged, and ``on_deleted`` hears of it so the manager's record
can say the recording is gone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cpvm.proxy.recording.recorder import INPUT_SUFFIX, PART_MARK, RECORDING_SUFFIX
from cpvm.proxy.recording.writer import PART_SUFFIX

DAY = 86400.0


@dataclass(frozen=True)
class StoredRecording:
    """One session's recording on disk: its files' total size and last write."""

    session_id: str
    mtime: float
    size: int
    # Still being written (a ".part" file, by any worker process): never deleted for
    # space; by age only when left behind (a crash).
    partial: bool = False


@dataclass(frozen=True)
class Deletion:
    """A recording to delete and why: ``age`` (older than the retention) or ``space``."""

    recording: StoredRecording
    reason: Literal["age", "space"]


def plan_deletions(
    recordings: Iterable[StoredRecording],
    *,
    now: float,
    retention_days: float,
    max_bytes: int,
    keep: frozenset[str] = frozenset(),
) -> list[Deletion]:
    """The deletions that bring a directory within its limits, oldest first.

    0 disables a limit. Recordings in ``keep`` (still being written) are never chosen and
    their bytes still count.
    """
    ordered = sorted(recordings, key=lambda r: (r.mtime, r.session_id))
    deletions: list[Deletion] = []
    remaining: list[StoredRecording] = []
    for r in ordered:
        if retention_days > 0 and r.session_id not in keep and now - r.mtime > retention_days * DAY:
            deletions.append(Deletion(r, "age"))
        else:
            remaining.append(r)
    if max_bytes > 0:
        total = sum(r.size for r in remaining)
        for r in remaining:
            if total <= max_bytes:
                break
            if r.session_id in keep or r.partial:
                continue
            deletions.append(Deletion(r, "space"))
            total -= r.size
    return deletions


def scan(directory: str) -> list[StoredRecording]:
    """Every recording in ``directory`` (its ``.fbs`` and ``.input.fbs`` files together)."""
    found: dict[str, tuple[float, int, bool]] = {}
    if not os.path.isdir(directory):  # nothing was ever recorded here
        return []
    with os.scandir(directory) as entries:
        for entry in entries:
            partial = entry.name.endswith(PART_SUFFIX)
            name = entry.name[: -len(PART_SUFFIX)] if partial else entry.name
            session_id = _session_of(name)
            if session_id is None or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            mtime, size, was_partial = found.get(session_id, (0.0, 0, False))
            found[session_id] = (max(mtime, st.st_mtime), size + st.st_size, was_partial or partial)
    return [StoredRecording(s, m, n, p) for s, (m, n, p) in found.items()]


def delete(directory: str, session_id: str) -> None:
    """Remove a session's recording files, every connection's (those already gone are
    fine)."""
    names = [
        name
        for name in os.listdir(directory)
        if (name.startswith(session_id + ".") or name.startswith(session_id + PART_MARK))
        and _session_of(name.removesuffix(PART_SUFFIX)) == session_id
    ]
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            pass


def _session_of(name: str) -> str | None:
    for suffix in (INPUT_SUFFIX, RECORDING_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            # A resumed session's later connections count with the session.
            return _PART.sub("", name[: -len(suffix)])
    return None


_PART = re.compile(re.escape(PART_MARK) + r"[0-9]+\Z")


class RetentionService(Service):
    """Applies the retention at start-up and every ``interval`` seconds.

    The directory is listed and files removed on a thread (``run_in_thread``: the
    recordings' drain thread), never on the reactor; decisions and log lines happen on
    the reactor.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        reactor,
        directory: str,
        retention_days: float,
        max_bytes: int,
        active: Callable[[], Iterable[str]],
        on_deleted: Callable[[str, str], None] = lambda session_id, reason: None,
        run_in_thread: Callable[..., Deferred],
        interval: float = 60.0,
    ):
        self._reactor = reactor
        self._directory = directory
        self._retention_days = retention_days
        self._max_bytes = max_bytes
        self._active = active
        self._on_deleted = on_deleted
        self._interval = interval
        self._run = run_in_thread
        self._loop: LoopingCall | None = None
        self._running: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        if self._retention_days <= 0 and self._max_bytes <= 0:
            return
        self._loop = LoopingCall(self.apply)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self):
        # A pass under way finishes on its thread; stopping never waits for a slow disk.
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def apply(self) -> Deferred | None:
        """One pass: list, decide, delete; fires when done (None if one is running)."""
        if self._running is not None:
            return None
        d = self._running = Deferred()
        d.addCallback(lambda _: self._run(scan, self._directory))
        d.addCallback(self._decide)
        d.addErrback(
            lambda f: self._log.warn(
                "recording retention failed: {error}", error=f.getErrorMessage()
            )
        )
        d.addBoth(self._done)
        d.callback(None)
        return d

    def _done(self, _):
        self._running = None

    def _decide(self, recordings: list[StoredRecording]) -> Deferred | None:
        deletions = plan_deletions(
            recordings,
            now=self._reactor.seconds(),
            retention_days=self._retention_days,
            max_bytes=self._max_bytes,
            keep=frozenset(self._active()),
        )
        if not deletions:
            return None
        d = self._run(_delete_all, self._directory, deletions)
        d.addCallback(self._deleted)
        return d

    def _deleted(self, deletions: list[Deletion]) -> None:
        now = self._reactor.seconds()
        for deletion in deletions:
            r = deletion.recording
            self._log.info(
                "recording deleted ({reason}): session {session}, {size} bytes, {age:.0f} s old",
                reason=deletion.reason,
                session=r.session_id,
                size=r.size,
                age=now - r.mtime,
            )
            self._on_deleted(r.session_id, deletion.reason)


def _delete_all(directory: str, deletions: list[Deletion]) -> list[Deletion]:
    for deletion in deletions:
        delete(directory, deletion.recording.session_id)
    return deletions
