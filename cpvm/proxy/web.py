"""cpvm's HTTP side: noVNC, the WebSocket endpoint, health, readiness and metrics.

The ``Site`` here keeps query strings and referrers out of the access log: console URLs
carry one-time tokens in both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from twisted.web import resource, static
from twisted.web.http import _escape

from cpvm.common.contract import WEBSOCKET_PATH
from cpvm.common.httplimits import HttpLimits, LimitedSite
from cpvm.proxy.headers import SecurityHeaders

NOVNC_PREFIX = (b"resource", b"noVNC")

# On top of what ConsoleSite sets on every answer (cpvm.proxy.headers).
_SECURITY_HEADERS = {
    b"Cache-Control": b"no-store",
}


class NotFound(resource.Resource):
    """A plain 404 for every path nothing else serves."""

    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found\n"


class Root(resource.Resource):
    """Serves only the children put on it; anything else is 404 (no listings)."""

    def getChild(self, path, request):  # noqa: N802
        return NotFound()

    def render(self, request):
        return NotFound().render(request)


class StaticFiles(static.File):
    """noVNC's files: no directory listings, security headers on every answer."""

    def directoryListing(self):  # noqa: N802
        return NotFound()

    def render(self, request):
        for name, value in _SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().render(request)

    def createSimilarFile(self, path):  # noqa: N802
        f = super().createSimilarFile(path)
        f.__class__ = StaticFiles
        return f


class Health(resource.Resource):
    """``/healthz`` answers 200 while the process serves; ``/readyz`` adds a check."""

    isLeaf = True

    def __init__(self, check: Callable[[], tuple[bool, str]] | None = None):
        super().__init__()
        self._check = check

    def render_GET(self, request):  # noqa: N802
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        if self._check is None:
            return b"ok\n"
        ready, why = self._check()
        if not ready:
            request.setResponseCode(503)
        return (("ready" if ready else "not ready") + f": {why}\n").encode("utf-8")


def build_root(
    *,
    novnc_dir: Path,
    websocket_factory,
    readiness: Callable[[], tuple[bool, str]],
    metrics: resource.Resource | None = None,
) -> Root:
    """The whole URL space of cpvm."""
    root = Root()
    res = Root()
    root.putChild(b"resource", res)
    res.putChild(b"noVNC", StaticFiles(str(novnc_dir)))
    root.putChild(WEBSOCKET_PATH.encode("ascii"), WebSocketResource(websocket_factory))
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Health(readiness))
    if metrics is not None:
        root.putChild(b"metrics", metrics)
    return root


def access_log_line(timestamp: str, request) -> str:
    """Combined log format without query string or referrer (both can carry tokens)."""
    try:
        ip = _escape(request.getClientAddress().host)
    except Exception:
        ip = "-"
    path = _escape(request.path.decode("latin-1", "replace"))
    agent = _escape(request.getHeader(b"user-agent") or "-")
    method = _escape(request.method.decode("latin-1", "replace"))
    proto = _escape(request.clientproto.decode("latin-1", "replace"))
    length = request.sentLength or "-"
    return (
        f'{ip} - - {timestamp} "{method} {path} {proto}" {int(request.code)} {length} "-" "{agent}"'
    )


class ConsoleSite(LimitedSite):
    """A ``Site`` whose access log never holds tokens; no server version banner; the
    security headers (CSP, frame-ancestors, nosniff, HSTS with TLS) on every answer; no
    request bodies, a deadline for each request and caps on connections not yet upgraded
    (``limits``, see :mod:`cpvm.common.httplimits`)."""

    def __init__(self, root, *, limits: HttpLimits, security_headers: SecurityHeaders, **kwargs):
        super().__init__(root, limits=limits, logFormatter=access_log_line, **kwargs)
        self.displayTracebacks = False
        self._security_headers = security_headers

    def getResourceFor(self, request):  # noqa: N802
        request.setHeader(b"Server", b"cpvm")
        self._security_headers.apply(request)
        return super().getResourceFor(request)
