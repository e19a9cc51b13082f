"""Writing the manager's JSON answers: status lines (CloudStack's error codes included),
``no-store``, and nothing once the client has gone."""

from __future__ import annotations

import json
from typing import Any

from twisted.web import http, server

STATUS_TEXT = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    410: b"Gone",
    429: b"Too Many Requests",
    431: b"Invalid Parameter",
    432: b"Unknown Command",
    500: b"Internal Error",
    503: b"Service Unavailable",
    530: b"Internal Error",
}


def alive(request: server.Request) -> bool:
    """The request can still be answered (not finished, its client still connected)."""
    return not getattr(request, "_disconnected", False) and not request.finished


def send_json(request: server.Request, status: int, body: Any | None) -> None:
    """Answer ``status`` with ``body`` as compact JSON (no body for None)."""
    if not alive(request):
        return
    request.setResponseCode(status, STATUS_TEXT.get(status))
    request.setHeader(b"cache-control", b"no-store")
    if body is None:
        request.finish()
        return
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.write(json.dumps(body, separators=(",", ":")).encode("utf-8"))
    request.finish()


def tcp_peer(request: http.Request) -> str | None:
    """The address that really connected (never X-Forwarded-For)."""
    return getattr(request.getClientAddress(), "host", None)
