"""The playback page and the one-time download of a recording, under ``/recording/``.

- ``/recording/play#ticket=T`` — the page (``static/play.html``) and its script
  (``player.js``), which imports stock noVNC's RFB client from ``/resource/noVNC/core/``
  and replays the file through it. The ticket rides in the fragment, which browsers never
  send: it reaches cpvm only in the download's query string, which the access log drops.
- ``/recording/data?ticket=T`` — the recording itself. ``redeem(ticket)`` (the manager,
  exactly once) says which session's file the ticket opens; a second use is refused.

The page lives under cpvm's Content-Security-Policy like noVNC itself: scripts, styles and
``fetch`` from cpvm only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, static
from twisted.web.server import NOT_DONE_YET

from cpvm.common.contract import MAX_TOKEN_LENGTH
from cpvm.proxy.recording.recorder import latest_part

STATIC = Path(__file__).resolve().parent / "static"
PLAYER_PATH = "recording"


class PlaybackRefused(Exception):
    """The ticket opens nothing: ``status`` and a message the page may show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _plain(request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    return (text + "\n").encode("utf-8")


def _gone(request) -> bool:
    # The browser went away (or the answer is out) while the manager was asked.
    return bool(request.finished or getattr(request, "_disconnected", False))


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        return _plain(request, 404, "not found")


class PlayerDirectory(resource.Resource):
    """``/recording/``: only its own children; anything else is 404."""

    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _plain(request, 404, "not found")


class _PlayerFile(static.File):
    """One file of the player, never cached (it changes with cpvm's version)."""

    def render(self, request):
        request.setHeader(b"Cache-Control", b"no-store")
        return super().render(request)

    def directoryListing(self):
        return _NotFound()


class RecordingDownload(resource.Resource):
    """``GET data?ticket=T``: the recording file a one-time ticket opens."""

    isLeaf = True
    _log = Logger()

    def __init__(self, *, directory: str, redeem: Callable[[str], Deferred]):
        super().__init__()
        self._directory = directory
        self._redeem = redeem

    def render_GET(self, request):
        tickets = request.args.get(b"ticket", [])
        if len(tickets) != 1 or not 0 < len(tickets[0]) <= MAX_TOKEN_LENGTH:
            return _plain(request, 400, "exactly one ticket is needed")
        try:
            ticket = tickets[0].decode("ascii")
        except UnicodeDecodeError:
            return _plain(request, 400, "exactly one ticket is needed")
        d = self._redeem(ticket)
        del ticket, tickets  # spent: one redemption per request, never retried
        d.addCallbacks(self._send, self._refused, callbackArgs=(request,), errbackArgs=(request,))
        d.addErrback(self._bug, request)
        return NOT_DONE_YET

    def _send(self, session_id: str, request) -> None:
        if _gone(request):
            return
        try:
            f = open(latest_part(self._directory, session_id), "rb")  # noqa: SIM115
        except (FileNotFoundError, ValueError):
            request.write(_plain(request, 410, "this recording is no longer kept"))
            request.finish()
            return
        size = os.fstat(f.fileno()).st_size
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", str(size).encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        self._log.info(
            "recording played back: session {session}, {size} bytes", session=session_id, size=size
        )
        static.NoRangeStaticProducer(request, f).start()

    def _refused(self, failure: Failure, request) -> None:
        failure.trap(PlaybackRefused)
        if _gone(request):
            return
        err = failure.value
        request.write(_plain(request, err.status, err.message))
        request.finish()

    def _bug(self, failure: Failure, request) -> None:
        self._log.failure("recording download failed", failure)
        if not _gone(request):
            request.write(_plain(request, 503, "the recording cannot be served now"))
            request.finish()


def build_player(*, directory: str, redeem: Callable[[str], Deferred]) -> resource.Resource:
    """The ``/recording/`` subtree: the page, its script and style, and the download."""
    player = PlayerDirectory()
    player.putChild(b"play", _PlayerFile(str(STATIC / "play.html"), defaultType="text/html"))
    player.putChild(b"player.js", _PlayerFile(str(STATIC / "player.js")))
    player.putChild(b"player.css", _PlayerFile(str(STATIC / "player.css")))
    player.putChild(b"data", RecordingDownload(directory=directory, redeem=redeem))
    return player
