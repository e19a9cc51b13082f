"""``/proxy/v1/…``: what cpvm instances call (docs/management-api.md). Routes, checks each
body at once (a 400 before any database work) and answers; the work, the proxy key's check
included, is :class:`cpvm.manager.proxy_broker.ProxyBroker`'s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Coroutine
from typing import Any, BinaryIO, cast

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cpvm.common.contract import END_REASONS, MAX_CAPACITY, looks_like_browser_hash
from cpvm.manager import instances
from cpvm.manager.json_http import send_json, tcp_peer
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_admission import ProxyForbidden, ProxyUnauthorized
from cpvm.manager.proxy_broker import REDEEM_MESSAGE, REDEEM_STATUS, ProxyBroker
from cpvm.manager.proxy_policy import public_host_problem
from cpvm.manager.recording_api import (
    PlaybackBroker,
    RecordingReportError,
    parse_deleted,
    parse_summary,
)

MAX_ENDED_PER_BEAT = 1000
MAX_DURATION = 10**9  # seconds (31 years) in an end report
MAX_WORKER = 1023
MAX_RECONNECTS = 10**9  # resumes of one session, as an end report may name them
MAX_BODY = 1024 * 1024

# What a handler returns: the coroutine that does the work and gives (status, answer).
Call = Coroutine[Any, Any, tuple[int, Any]]


class ProxyApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _unauthorized() -> ProxyApiError:
    return ProxyApiError(401, "unauthorized", "unknown, malformed or revoked proxy key")


def _bad(message: str) -> ProxyApiError:
    return ProxyApiError(400, "bad_request", message)


def _source_not_allowed() -> ProxyApiError:
    return ProxyApiError(
        403, "source_not_allowed", "this proxy key may not be used from this address"
    )


def _json_body(request: server.Request) -> dict[str, Any]:
    content = cast(BinaryIO, request.content)
    content.seek(0)
    raw = content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise _bad("body too large")
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # deep nesting: RecursionError
        raise _bad("body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad("body is not a JSON object")
    return body


def _string(body: dict, key: str, *, optional: bool = False, maximum: int = 512) -> str | None:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not (1 <= len(value) <= maximum):
        raise _bad(f"{key} must be a string of 1 to {maximum} characters")
    return value


def _int(body: dict, key: str, minimum: int = 0, maximum: int = 2**62) -> int:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise _bad(f"{key} must be an integer from {minimum} to {maximum}")
    return value


class ProxyApiResource(Resource):
    """``/proxy/v1/…``: what cpvm instances call (docs/management-api.md)."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self, broker: ProxyBroker, metrics: ManagerMetrics, playback: PlaybackBroker | None = None
    ):
        super().__init__()
        self._broker = broker
        self._metrics = metrics
        self._playback = playback

    def render(self, request: server.Request) -> int:
        ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        parts = [p.decode("utf-8", "replace") for p in cast("list[bytes]", request.postpath)]
        endpoint = _endpoint(parts)
        try:
            try:
                status, answer = await self._answer(request, endpoint, parts[2:])
            except ProxyUnauthorized:
                raise _unauthorized() from None
            except ProxyForbidden:
                raise _source_not_allowed() from None
        except ProxyApiError as e:
            status, answer = e.status, {"error": e.code, "message": e.message}
            if e.status == 401:
                self._log.warn(
                    "proxy API {endpoint}: {message}",
                    endpoint=endpoint,
                    message=e.message,
                    client_address=tcp_peer(request),
                )
        except Exception:
            self._log.failure("proxy API request failed", endpoint=endpoint)
            status, answer = 500, {"error": "internal_error", "message": "see the manager's log"}
        self._metrics.proxy_requests.labels(endpoint, str(status)).inc()
        send_json(request, status, answer)

    async def _answer(
        self, request: server.Request, endpoint: str, rest: list[str]
    ) -> tuple[int, Any]:
        """``(status, answer)`` of a call to ``endpoint``; raises ProxyApiError, or the
        broker's ProxyUnauthorized / ProxyForbidden."""
        if endpoint == "unknown":
            raise ProxyApiError(404, "not_found", "no such endpoint")
        if request.method != b"POST":
            raise ProxyApiError(405, "method_not_allowed", "use POST")
        key = self._bearer_key(request)
        # The TCP peer, never X-Forwarded-For: a key's allowed networks are checked
        # against the address that really connected.
        peer = tcp_peer(request)
        try:
            body = _json_body(request)
            if endpoint == "redeem":
                call = self._redeem(key, body, peer)
            elif endpoint == "heartbeat":
                call = self._heartbeat(key, body, peer)
            elif endpoint == "playback":
                call = self._playback_ticket(key, body, peer)
            else:
                call = self._end(key, rest[0], body, peer)
        except ProxyApiError:
            # A caller without a valid key (or from outside its networks) is told so,
            # whatever its body holds.
            await self._broker.authenticate_proxy(key, peer)
            raise
        # The key is checked in the same database transaction as the request.
        return await call

    @staticmethod
    def _bearer_key(request: server.Request) -> str:
        """The proxy key of the Authorization header (syntax only; 401 when absent)."""
        header = request.getHeader(b"authorization")
        if not header:
            raise ProxyApiError(401, "unauthorized", "missing Authorization header")
        scheme, _, key = header.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ProxyApiError(401, "unauthorized", "expected a Bearer proxy key")
        return key.strip()

    # Each handler validates the body at once (raising 400 before any database work) and
    # returns the coroutine that does the work, the key's check included.

    def _redeem(self, key: str, body: dict, peer: str | None) -> Call:
        token = _string(body, "token")
        extra = body.get("extra")
        if extra is not None and not isinstance(extra, str):
            raise _bad("extra must be a string or null")
        if extra == "":
            extra = None
        address = _string(body, "client_address", maximum=100)
        assert token is not None and address is not None
        worker = _int(body, "worker", 0, MAX_WORKER) if "worker" in body else 0
        browser_hash = body.get("browser_hash")
        if browser_hash is not None and not looks_like_browser_hash(browser_hash):
            raise _bad("browser_hash must be 64 lowercase hex digits (a SHA-256) or null")
        return self._redeem_call(
            key, token, extra, address, worker, _instance(body), peer, browser_hash
        )

    async def _redeem_call(
        self,
        key: str,
        token: str,
        extra: str | None,
        address: str,
        worker: int,
        instance: str | None,
        peer: str | None,
        browser_hash: str | None = None,
    ) -> tuple[int, Any]:
        result = await self._broker.redeem_with_key(
            key, token, extra, address, worker, instance, peer, browser_hash
        )
        if result.error is None:
            return 200, result.body
        return REDEEM_STATUS[result.error], {
            "error": result.error,
            "message": REDEEM_MESSAGE[result.error],
        }

    def _heartbeat(self, key: str, body: dict, peer: str | None) -> Call:
        sessions = body.get("active_sessions", [])
        if not isinstance(sessions, list) or not all(isinstance(s, str) for s in sessions):
            raise _bad("active_sessions must be a list of session ids")
        tls = body.get("tls")
        if not isinstance(tls, bool):
            raise _bad("tls must be true or false")
        public_host = _string(body, "public_host", maximum=255)
        assert public_host is not None
        problem = public_host_problem(public_host)
        if problem is not None:
            raise _bad(problem)
        beat = {
            "public_host": public_host,
            "public_port": _int(body, "public_port", 1, 65535),
            "tls": tls,
            "address": _string(body, "address", optional=True, maximum=100),
            "capacity": _int(body, "capacity", 0, MAX_CAPACITY),
            "active_count": len(sessions),
            "version": _string(body, "version", optional=True, maximum=100),
            "ended": _ended_reports(body),
            "recordings_deleted": _recordings_deleted(body),
            "worker": _int(body, "worker", 0, MAX_WORKER) if "worker" in body else 0,
            # Absent (an older cpvm): no reconciliation against the list.
            "active_sessions": sessions if "active_sessions" in body else None,
            "instance": _instance(body),
            "peer": peer,
        }
        return self._heartbeat_call(key, beat, peer)

    async def _heartbeat_call(self, key: str, beat: dict, peer: str | None) -> tuple[int, Any]:
        answer = await self._broker.heartbeat_with_key(key, beat, peer)
        if isinstance(answer, instances.InstanceEvent):
            raise ProxyApiError(409, "instance_conflict", instances.CONFLICT_MESSAGE)
        return 200, answer

    def _playback_ticket(self, key: str, body: dict, peer: str | None) -> Call:
        ticket = _string(body, "ticket")
        assert ticket is not None
        return self._playback_call(key, ticket, peer)

    async def _playback_call(self, key: str, ticket: str, peer: str | None) -> tuple[int, Any]:
        proxy_id = await self._broker.authenticate_proxy(key, peer)
        if self._playback is None:
            raise ProxyApiError(404, "not_found", "no such endpoint")
        return await self._playback.redeem(proxy_id, ticket)

    def _end(self, key: str, session_id: str, body: dict, peer: str | None) -> Call:
        return self._end_call(key, session_id, _end_report(body), peer)

    async def _end_call(
        self, key: str, session_id: str, report: dict, peer: str | None
    ) -> tuple[int, Any]:
        try:
            session_id = str(uuid.UUID(session_id))
        except ValueError:
            # Unauthenticated callers get 401, not a hint about session ids.
            await self._broker.authenticate_proxy(key, peer)
            raise ProxyApiError(404, "unknown_session", "no such session") from None
        found = await self._broker.report_end_with_key(key, session_id, report, peer)
        if not found:
            raise ProxyApiError(404, "unknown_session", "not a session redeemed through this proxy")
        return 204, None


def _instance(body: dict) -> str | None:
    """The caller's cpvm instance id (absent or null: a cpvm older than the rule)."""
    value = body.get("instance")
    if value is None:
        return None
    if not isinstance(value, str) or not instances.INSTANCE_ID.match(value):
        raise _bad("instance must be 1 to 64 letters, digits, '-' or '_'")
    return value


def _end_report(body: Any) -> dict:
    """A session's end report (single end call or one item of a heartbeat's ``ended``)."""
    if not isinstance(body, dict):
        raise _bad("an end report must be an object")
    reason = body.get("reason")
    # A string first: END_REASONS is a set, and an object is not hashable (a TypeError).
    if not isinstance(reason, str) or reason not in END_REASONS:
        raise _bad("reason is not one of the documented end reasons")
    duration = body.get("duration", 0)
    # The range check also refuses NaN, Infinity (JSON extensions Python accepts, and 1e999)
    # and integers too large for a float: they would reach the audit log and listings.
    if (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not 0 <= duration <= MAX_DURATION
    ):
        raise _bad(f"duration must be a number of seconds from 0 to {MAX_DURATION}")
    report = {
        "reason": reason,
        "client_address": _string(body, "client_address", optional=True, maximum=100),
        "bytes_to_client": _int(body, "bytes_to_client"),
        "bytes_to_server": _int(body, "bytes_to_server"),
        "duration": float(duration),
        "recording": _recording_summary(body),
    }
    if body.get("reconnects") is not None:
        # Which connection of a resumed session ended (absent: an older cpvm, the current).
        report["reconnects"] = _int(body, "reconnects", 0, MAX_RECONNECTS)
    return report


def _recording_summary(body: dict) -> dict | None:
    # A malformed summary must not cost the session its end: it is dropped, the end kept.
    try:
        return parse_summary(body.get("recording"))
    except RecordingReportError as e:
        _reports_log.warn("end report: dropped its recording summary: {message}", message=str(e))
        return None


def _recordings_deleted(body: dict) -> list[str]:
    try:
        return parse_deleted(body)
    except RecordingReportError as e:
        raise _bad(str(e)) from None


_reports_log = Logger(namespace="cpvm.manager.proxy_api")


def _ended_reports(body: dict) -> list[tuple[str, dict]]:
    """The heartbeat's batch of end reports: ``[(session id, report), ...]``."""
    items = body.get("ended", [])
    if not isinstance(items, list) or len(items) > MAX_ENDED_PER_BEAT:
        raise _bad(f"ended must be a list of at most {MAX_ENDED_PER_BEAT} end reports")
    reports = []
    for item in items:
        # One bad report must not poison the batch: refusing the heartbeat would put it
        # back first in the proxy's queue and fail every heartbeat after it.
        try:
            report = _end_report(item)
            session_id = str(uuid.UUID(str(item.get("session_id"))))
        except ProxyApiError as e:
            _reports_log.warn("heartbeat: dropped an end report: {message}", message=e.message)
            continue
        except (ValueError, AttributeError):
            _reports_log.warn("heartbeat: dropped an end report: session_id is not a session id")
            continue
        reports.append((session_id, report))
    return reports


def _endpoint(parts: list[str]) -> str:
    """The endpoint a path (after ``/proxy/``) names, for routing and metrics labels."""
    if parts[:1] != ["v1"]:
        return "unknown"
    route = parts[1:]
    if route == ["redeem"]:
        return "redeem"
    if route == ["heartbeat"]:
        return "heartbeat"
    if route == ["playback"]:
        return "playback"
    if len(route) == 3 and route[0] == "sessions" and route[2] == "end":
        return "end"
    return "unknown"
