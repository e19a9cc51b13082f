"""Refusals a person can read, and the log line for those nobody in the browser can.

A WebSocket refused before the upgrade is only an HTTP status, which noVNC shows as
"disconnected" and nothing more. So a refusal that is about the console the person asked
for (the URL lost its token, this proxy is full) is told after the upgrade instead:
:class:`ToldRefusal` answers the browser's RFB version with a security failure whose
reason noVNC shows ("New connection has been rejected with reason: …"), then the socket
closes with the outcome's code and text. No token is redeemed and no VNC server is
reached on this path.

An Origin that is not allowed stays refused before the upgrade: a page from another site
gets no open socket from cpvm at all (cross-site WebSocket hijacking). The person cannot
be told, so the operator is: :func:`origin_refusal_detail` names the origin and the
setting that would allow it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from cpvm.common.contract import Outcome
from cpvm.rfb.events import ClientVersionReceived, Failed, Send
from cpvm.rfb.server import RfbServerHandshake

#: How long a told refusal waits for the browser's RFB version before it closes with the
#: code and text alone (noVNC sends its version at once).
TELL_GRACE = 2.0
#: Refusals being told at once; beyond this the refusal is an HTTP status again, so a
#: flood of bad requests cannot hold open sockets (each holds one for up to TELL_GRACE).
MAX_TOLD_AT_ONCE = 64
# An Origin header is whatever the client sent: bounded and printable in a log line.
_MAX_ORIGIN_IN_LOG = 200


class ToldRefusal:
    """Sans-IO: cpvm's RFB greeting, then a security failure carrying ``outcome.text``.

    :meth:`start` gives the bytes to send when the WebSocket opens; :meth:`receive` takes
    the browser's bytes and answers ``(bytes to send, finished)``; when finished, close
    with ``outcome.code`` and ``outcome.text``.
    """

    def __init__(self, outcome: Outcome):
        self.outcome = outcome
        self._handshake = RfbServerHandshake()
        self.finished = False

    def start(self) -> bytes:
        return _sent(self._handshake.start())

    def receive(self, data: bytes) -> tuple[bytes, bool]:
        if self.finished:
            return b"", True
        out = b""
        for event in self._handshake.receive(data):
            if isinstance(event, ClientVersionReceived):
                out += _sent(self._handshake.reject(self.outcome.text))
                self.finished = True
            elif isinstance(event, Failed):
                self.finished = True  # not RFB: the close code and text are all it gets
            elif isinstance(event, Send):
                out += event.data
        return out, self.finished


def _sent(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def printable(text: str, limit: int = _MAX_ORIGIN_IN_LOG) -> str:
    """``text`` as a log may show it: printable characters only, at most ``limit``."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("..." if len(text) > limit else "")


def origin_refusal_detail(
    origin: str, host: str | None, scheme: str, allowed: tuple[str, ...]
) -> str:
    """Why ``origin`` was refused and what to change, for the log (never the browser)."""
    shown = printable(origin)
    now = ", ".join(allowed) if allowed else "(empty)"
    detail = (
        f"origin {shown!r} is not allowed: to let that page open consoles, add it to"
        f" [server] allowed_origins in cpvm.conf (now: {now})"
    )
    try:
        parts = urlsplit(origin.lower())
    except ValueError:  # "https://[" and the like: nothing more to explain
        return detail
    if "self" in allowed and host and parts.netloc == host.lower() and parts.scheme != scheme:
        # A TLS-terminating proxy in front: the page is https, cpvm's own listener is not.
        detail += (
            f"; the page is {parts.scheme}:// but cpvm's listener is {scheme}://, so 'self'"
            " does not match it (list the origin itself)"
        )
    return detail
