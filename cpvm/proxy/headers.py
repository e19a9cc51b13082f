"""Security headers on every answer cpvm's HTTP side gives.

The one that matters most is ``connect-src``: stock noVNC's ``vnc.html`` takes the WebSocket's
``host``, ``port`` and ``path`` from its query string, so without a policy a link to the
trusted cpvm page could point the console at an attacker's WebSocket (and have the user type
into it). ``connect-src`` lets the page connect to cpvm itself only.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# What noVNC's vnc.html needs, nothing more: its own scripts, styles, images (JPEG
# rectangles and the dot cursor are data: URLs), fonts, the bell sound, fetch() of its
# locale files, and the WebSocket.
_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob:; font-src 'self'; media-src 'self'; "
    "base-uri 'none'; form-action 'self'"
)
HSTS = b"max-age=31536000"
# A Host header we are willing to repeat in a header: a name or address and a port.
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_SOURCE_KEYWORDS = ("'self'", "'none'")


def check_frame_ancestors(sources: tuple[str, ...]) -> str:
    """The ``frame-ancestors`` sources as one CSP value; ``ValueError`` says what is wrong.

    Allowed: ``'self'``, ``'none'`` (alone), or origins such as
    ``https://dashboard.example.com`` or ``https://*.example.com:8443``.
    """
    if not sources:
        raise ValueError("needs at least one source ('self', 'none' or an origin)")
    if "'none'" in sources and len(sources) > 1:
        raise ValueError("'none' cannot be combined with other sources")
    for source in sources:
        if source in _SOURCE_KEYWORDS:
            continue
        parts = urlsplit(source)
        host = parts.netloc.removeprefix("*.")
        if (
            parts.scheme not in ("http", "https")
            or not _HOST.fullmatch(host)
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"{source!r} is not 'self', 'none' or an origin like https://dashboard.example.com"
            )
    return " ".join(s.rstrip("/") for s in sources)


class SecurityHeaders:
    """The headers for one cpvm: fixed at start-up but for the WebSocket origin, which is
    the Host the browser used (a proxy in front may rename cpvm)."""

    def __init__(self, *, tls: bool, frame_ancestors: str):
        self._ws_scheme = "wss" if tls else "ws"
        self._policy_tail = f"; frame-ancestors {frame_ancestors}"
        fixed = {
            b"X-Content-Type-Options": b"nosniff",
            # The console URL holds a token: never send it onwards as a referrer.
            b"Referrer-Policy": b"no-referrer",
        }
        # Browsers without frame-ancestors understand only these two.
        legacy = {"'self'": b"SAMEORIGIN", "'none'": b"DENY"}.get(frame_ancestors)
        if legacy is not None:
            fixed[b"X-Frame-Options"] = legacy
        if tls:
            fixed[b"Strict-Transport-Security"] = HSTS
        self._fixed = fixed

    def policy(self, host: bytes | None) -> bytes:
        """The Content-Security-Policy for a request that named ``host``."""
        connect = "connect-src 'self'"
        name = host.decode("ascii", "replace") if host else ""
        if _HOST.fullmatch(name):
            # CSP3 browsers let 'self' cover ws(s): to the page's host; older ones need it
            # spelled out.
            connect += f" {self._ws_scheme}://{name}"
        return f"{_POLICY}; {connect}{self._policy_tail}".encode("ascii")

    def apply(self, request) -> None:
        """Set every header on a twisted.web request."""
        for name, value in self._fixed.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Security-Policy", self.policy(request.getHeader(b"host")))
