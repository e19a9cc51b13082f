"""One console session's recording: the FBS file and, with ``record_input``, the input file.

The main file ``<session id>.fbs`` holds the server→client stream (see :mod:`.fbs`). The
input file ``<session id>.input.fbs`` uses the same block format and the same clock for
the browser's client→server messages from the first one after ClientInit (keys, pointer,
clipboard, and the automatic ones such as FramebufferUpdateRequest); it exists only when
``record_input`` is on, because people type passwords into consoles.

The synthetic handshake is written when the server's first message after ServerInit is
relayed (or at the end), not at ServerInit: the server encodes its updates in the pixel
format the *browser* asked for with SetPixelFormat just after ServerInit, so that format,
not the server's own, is the one a player must be told.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from cpvm.proxy.recording.fbs import FbsEncoder
from cpvm.proxy.recording.writer import DrainThread, FileResult, InlineDrain, RecordingFile
from cpvm.rfb import ServerInit

RECORDING_SUFFIX = ".fbs"
INPUT_SUFFIX = ".input.fbs"
# A resumed session (the reconnect window) records each connection after the first to
# <id>-r<N>.fbs, N its reconnect count.
PART_MARK = "-r"
# Session ids are the manager's UUIDs; anything else must not become a path.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")
# What may wait for the disk per file before the recording counts as failed.
DEFAULT_MAX_BUFFER = 8 * 1024 * 1024

OnFailure = Literal["end", "continue"]


def recording_path(
    directory: str, session_id: str, suffix: str = RECORDING_SUFFIX, part: int = 0
) -> str:
    """The file of a session's recording (``part`` N > 0: its N-th resumed connection,
    ``<id>-rN``); ``ValueError`` for an id unfit for a file name."""
    if not _SESSION_ID.match(session_id):
        raise ValueError(f"session id {session_id!r} cannot name a recording file")
    stem = f"{session_id}{PART_MARK}{part}" if part else session_id
    return os.path.join(directory, stem + suffix)


def latest_part(directory: str, session_id: str) -> str:
    """The file of a session's last connection: what its last end report summarised."""
    recording_path(directory, session_id)  # the id's check
    prefix = session_id + PART_MARK
    parts = [
        int(name[len(prefix) : -len(RECORDING_SUFFIX)])
        for name in _names(directory)
        if name.startswith(prefix)
        and name.endswith(RECORDING_SUFFIX)
        and not name.endswith(INPUT_SUFFIX)
        and name[len(prefix) : -len(RECORDING_SUFFIX)].isdigit()
    ]
    return recording_path(directory, session_id, part=max(parts, default=0))


def _names(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class RecordingSettings:
    """``[recording]`` as a recorder needs it."""

    directory: str
    record_input: bool = False
    on_failure: OnFailure = "end"
    max_buffer: int = DEFAULT_MAX_BUFFER


@dataclass(frozen=True)
class RecordingSummary:
    """What the end report says about a recording: the main file's size and SHA-256, its
    duration in seconds (millisecond resolution), and whether it is complete."""

    size: int
    sha256: str
    duration: float
    complete: bool
    error: str | None = None
    input_size: int | None = None

    def report(self) -> dict:
        """The ``recording`` object of an end report (docs/management-api.md)."""
        return {
            "size": self.size,
            "sha256": self.sha256,
            "duration": self.duration,
            "complete": self.complete,
        }


class SessionRecorder:
    """Records one session; every method runs on the reactor thread and never blocks.

    ``on_failure(reason)`` is called at most once, when a file fails (disk full or too
    slow); the session decides what follows. After a failure the recorder writes nothing
    more and its summary says ``complete: false``.
    """

    _log = Logger()

    def __init__(
        self,
        *,
        settings: RecordingSettings,
        session_id: str,
        part: int = 0,
        drain: DrainThread | InlineDrain,
        call_from_thread: Callable[..., None],
        on_failure: Callable[[str], None],
    ):
        self.session_id = session_id
        self.part = part
        self.path = recording_path(settings.directory, session_id, part=part)
        self._settings = settings
        self._drain = drain
        self._call_from_thread = call_from_thread
        self._on_failure = on_failure
        self.failure: str | None = None
        self._server_init: ServerInit | None = None
        self._encoder: FbsEncoder | None = None
        self._main: RecordingFile | None = None
        self._input: RecordingFile | None = None
        self._input_encoder: FbsEncoder | None = None
        self._handshake_written = False
        self._finished = False
        self._pixel_format: bytes | None = None  # the browser's, as the handshake says
        self._format_changed = False

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called (the relay began)."""
        return self._main is not None

    def start(self, server_init: ServerInit, now: float) -> None:
        """The relay starts now (timestamp 0) with the ServerInit the browser was sent."""
        if self._main is not None:
            raise RuntimeError("start() called twice")
        self._server_init = server_init
        self._encoder = FbsEncoder(now)
        self._main = self._open(self.path)
        if self._settings.record_input:
            input_path = recording_path(
                self._settings.directory, self.session_id, INPUT_SUFFIX, self.part
            )
            self._input = self._open(input_path)
            self._input_encoder = FbsEncoder(now)
            self._input.write(self._input_encoder.header_only())

    def server_data(self, data: bytes, now: float, pixel_format: bytes | None = None) -> None:
        """A chunk relayed to the browser; ``pixel_format`` is the browser's latest
        SetPixelFormat, if it sent one."""
        if self.failure is not None or self._encoder is None:
            return
        if not self._handshake_written:
            self._write_handshake(pixel_format)
        elif pixel_format is not self._pixel_format and not self._format_changed:
            self._pixel_format_changed(pixel_format)
        self._main.write(self._encoder.data(data, now))  # type: ignore[union-attr]

    def client_data(self, data: bytes, now: float) -> None:
        """A chunk the browser sent (kept only with ``record_input``)."""
        if self._input is None or self.failure is not None:
            return
        self._input.write(self._input_encoder.data(data, now))  # type: ignore[union-attr]

    def finish(self, now: float) -> Deferred:
        """Close the files; fires with the :class:`RecordingSummary`."""
        if self._main is None or self._encoder is None:
            raise RuntimeError("finish() before start()")
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if not self._handshake_written and self.failure is None:
            self._write_handshake(None)
        duration = self._encoder.elapsed_ms(now) / 1000
        files = [self._main.finish()]
        if self._input is not None:
            files.append(self._input.finish())
        d = gatherResults(files, consumeErrors=True)
        d.addCallback(self._summary, duration)
        return d

    def _summary(self, results: list[FileResult], duration: float) -> RecordingSummary:
        main = results[0]
        failed = [r for r in results if not r.complete]
        return RecordingSummary(
            size=main.size,
            sha256=main.sha256,
            duration=duration,
            complete=not failed and self.failure is None,
            error=self.failure or (failed[0].error if failed else None),
            input_size=results[1].size if len(results) > 1 else None,
        )

    def _open(self, path: str) -> RecordingFile:
        return RecordingFile(
            path,
            drain=self._drain,
            call_from_thread=self._call_from_thread,
            max_buffer=self._settings.max_buffer,
            on_failure=self._failed,
        )

    def _write_handshake(self, pixel_format: bytes | None) -> None:
        self._handshake_written = True
        self._pixel_format = pixel_format
        server_init = self._server_init
        assert server_init is not None and self._encoder is not None and self._main is not None
        if pixel_format is not None and pixel_format != server_init.pixel_format:
            server_init = dataclasses.replace(server_init, pixel_format=pixel_format)
        # Stamped 0: the browser had ServerInit when the relay started.
        self._main.write(self._encoder.start(server_init, self._encoder.origin))

    def _pixel_format_changed(self, pixel_format: bytes | None) -> None:
        # FBS has no way to say it: players decode what follows in the first format.
        if pixel_format == self._pixel_format:
            self._pixel_format = pixel_format  # the same bytes again: nothing changed
            return
        self._format_changed = True
        self._log.warn(
            "recording of session {session}: the browser changed its pixel format after "
            "the recording began; players show what follows in the first format",
            session=self.session_id,
        )

    def _failed(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._on_failure(reason)
