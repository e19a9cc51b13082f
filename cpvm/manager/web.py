"""HTTP resources of the manager: the public CloudStack-style API, the proxy API,
health and metrics, and a ``Site`` whose access log never holds a query string.

Resources parse requests and format answers; the decisions are in
:class:`cpvm.manager.consoles.ConsoleBroker`.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO, cast
from urllib.parse import parse_qs

from twisted.internet.defer import ensureDeferred, inlineCallbacks
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from cpvm.common.addresses import client_address
from cpvm.common.contract import END_REASONS, MAX_EXTRA_LENGTH
from cpvm.common.httplimits import HttpLimits, LimitedSite
from cpvm.common.metrics import MetricsPage
from cpvm.common.ratelimit import KeyedRateLimiter
from cpvm.manager import instances, signing, store
from cpvm.manager.config import IPNetwork
from cpvm.manager.consoles import (
    FORBIDDEN,
    REDEEM_MESSAGE,
    REDEEM_STATUS,
    UNAUTHORIZED,
    ConsoleBroker,
    Endpoint,
)
from cpvm.manager.db import Database
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.params import ParamError, parse_params
from cpvm.manager.proxy_policy import public_host_problem
from cpvm.manager.secrets_box import SecretBox, SecretKeyError

_STATUS_TEXT = {
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

BAD_CREDENTIALS = "unable to verify user credentials and/or request signature"


def _alive(request: server.Request) -> bool:
    return not getattr(request, "_disconnected", False) and not request.finished


def _send_json(request: server.Request, status: int, body: Any | None) -> None:
    if not _alive(request):
        return
    request.setResponseCode(status, _STATUS_TEXT.get(status))
    request.setHeader(b"cache-control", b"no-store")
    if body is None:
        request.finish()
        return
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.write(json.dumps(body, separators=(",", ":")).encode("utf-8"))
    request.finish()


class ApiError(Exception):
    """A CloudStack error envelope to send: errorcode is also the HTTP status;
    ``retry_after`` (seconds) becomes a ``Retry-After`` header."""

    def __init__(self, code: int, text: str, retry_after: float | None = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.retry_after = retry_after


def _throttled(wait: float) -> ApiError:
    # CloudStack's own answer when api.throttling is on (errorcode 429, API_LIMIT_EXCEED).
    ms = max(1, math.ceil(wait * 1000))
    return ApiError(
        429,
        f"The given user has reached his/her account api limit, please retry after {ms} ms. "
        "(createConsoleEndpoint is rate-limited per API key)",
        retry_after=wait,
    )


def _session_json(r: store.SessionRecord) -> dict[str, Any]:
    fields = {
        "id": r.id,
        "created": signing.format_time(r.created_at),
        "acquired": signing.format_time(r.acquired_at) if r.acquired_at is not None else None,
        "removed": signing.format_time(r.ended_at) if r.ended_at is not None else None,
        "ended": signing.format_time(r.ended_at) if r.ended_at is not None else None,
        "account": r.account_name,
        "accountid": r.account_id,
        "virtualmachineid": r.vm_id,
        "vmname": r.vm_name,
        "consoleproxy": r.proxy_name,
        "consoleproxyid": r.proxy_id,
        "creatoraddress": r.creator_address,
        "clientaddress": r.client_address,
        "endreason": r.end_reason,
        "bytestoclient": r.bytes_to_client,
        "bytestoserver": r.bytes_to_server,
        "duration": r.duration,
        "terminaterequested": (
            signing.format_time(r.terminate_requested_at)
            if r.terminate_requested_at is not None
            else None
        ),
    }
    # CloudStack leaves out what is null.
    return {k: v for k, v in fields.items() if v is not None}


def _bool_param(name: str, value: str | None) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ApiError(431, f"Invalid parameter {name} value={value!r}: expected true or false")


def _uuid_param(name: str, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(431, f"Invalid parameter {name} value: not a UUID") from None


# The commands, by lower-cased name (the API reads names case-insensitively), with the
# spelling used in metrics labels.
COMMANDS = {
    name.lower(): name
    for name in ("createConsoleEndpoint", "listConsoleSessions", "endConsoleSession")
}


class PublicApiResource(Resource):
    """``/client/api``: CloudStack-compatible, signed, JSON only."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        broker: ConsoleBroker,
        db: Database,
        box: SecretBox,
        clock: Any,
        trusted_proxies: tuple[IPNetwork, ...],
        metrics: ManagerMetrics,
        expiry: signing.ExpiryPolicy = signing.ExpiryPolicy(),
        create_limiter: KeyedRateLimiter | None = None,
    ):
        super().__init__()
        self._broker = broker
        self._db = db
        self._box = box
        self._clock = clock
        self._trusted = trusted_proxies
        self._metrics = metrics
        self._expiry = expiry
        self._create_limiter = (
            create_limiter if create_limiter is not None else KeyedRateLimiter(0, 1, clock)
        )
        self._commands: dict[str, Callable[..., Any]] = {
            "createconsoleendpoint": self._create_console_endpoint,
            "listconsolesessions": self._list_console_sessions,
            "endconsolesession": self._end_console_session,
        }
        # listVirtualMachines and the admin VM commands (cpvm/manager/vm_api.py).
        from cpvm.manager import vm_api

        self._commands.update(vm_api.commands(db, box, clock))

    def render_GET(self, request: server.Request) -> int:
        ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    render_POST = render_GET

    async def _handle(self, request: server.Request) -> None:
        command = ""
        account_name = None
        reason = ""
        try:
            params = self._params(request)
            command = params.get("command", "")
            status, body = await self._dispatch(request, params)
            account_name = getattr(request, "_cpvm_account", None)
        except ApiError as e:
            status = e.code
            reason = e.text  # errortexts name parameters; none carries a key, token or signature
            if e.retry_after is not None and _alive(request):
                request.setHeader(b"retry-after", b"%d" % max(1, math.ceil(e.retry_after)))
            body = {
                f"{(command or 'error').lower()}response": {
                    "uuidList": [],
                    "errorcode": e.code,
                    "cserrorcode": 9999,
                    "errortext": e.text,
                }
            }
        except Exception:
            self._log.failure("public API request failed", command=command)
            status = 530
            body = {
                f"{(command or 'error').lower()}response": {
                    "uuidList": [],
                    "errorcode": 530,
                    "cserrorcode": 9999,
                    "errortext": "internal error, see the manager's log",
                }
            }
        # The canonical name: the caller's spelling would make one series per spelling.
        label = COMMANDS.get(command.lower(), "unknown")
        self._metrics.api_requests.labels(label, str(status)).inc()
        self._log.info(
            "api {command} -> {status} {reason}",
            command=command or None,
            status=status,
            reason=reason,
            account=account_name or getattr(request, "_cpvm_account", None),
            client_address=self._creator_address(request),
        )
        _send_json(request, status, body)

    def _params(self, request: server.Request) -> dict[str, str]:
        query_args = None
        if request.method == b"POST" and b"?" in request.uri:
            query_args = parse_qs(request.uri.split(b"?", 1)[1], keep_blank_values=True)
        try:
            # Twisted types Request.args (and .content) by their class default, None.
            return parse_params(cast("dict[bytes, list[bytes]]", request.args or {}), query_args)
        except ParamError as e:
            raise ApiError(431, e.text) from None

    def _creator_address(self, request: server.Request) -> str:
        peer = request.getClientAddress()
        host = getattr(peer, "host", None) or "unknown"
        headers = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        return client_address(host, [h.decode("latin-1") for h in headers], self._trusted)

    async def _dispatch(self, request: server.Request, params: dict[str, str]):
        lower = {k.lower(): v for k, v in params.items()}
        command = params.get("command")
        if not command:
            raise ApiError(432, "no command given")
        response_format = lower.get("response", "json")
        if response_format.lower() != "json":
            raise ApiError(431, "only response=json is supported")
        account = await self._authenticate(params, lower)
        request._cpvm_account = account.name  # type: ignore[attr-defined]
        handler = self._commands.get(command.lower())
        if handler is None:
            raise ApiError(432, f"unknown command {command!r}")
        if command.lower() == "createconsoleendpoint":
            # Per API key, after the signature: nobody drains another key's budget.
            wait = self._create_limiter.take(lower["apikey"])
            if wait > 0:
                raise _throttled(wait)
        return await handler(request, account, lower, command.lower())

    async def _authenticate(self, params: dict[str, str], lower: dict[str, str]):
        api_key = lower.get("apikey")
        signature = lower.get("signature")
        if not api_key or not signature:
            raise ApiError(401, BAD_CREDENTIALS)
        try:
            signing.check_expiry(lower, self._clock.seconds(), self._expiry)
        except signing.SignatureTimeError as e:
            raise ApiError(401, e.text) from None
        caller = await self._db.read(store.lookup_caller, api_key)
        if caller is None:
            raise ApiError(401, BAD_CREDENTIALS)
        try:
            secret = self._box.decrypt(caller.secret_enc)
        except SecretKeyError:
            self._log.error(
                "API secret of account {account} cannot be decrypted", account=caller.account.name
            )
            raise ApiError(530, "internal error, see the manager's log") from None
        if not signing.verify(params, secret, signature):
            raise ApiError(401, BAD_CREDENTIALS)
        return caller.account

    # Commands -------------------------------------------------------------------------

    async def _create_console_endpoint(self, request, account, p, name):
        vm_id = p.get("virtualmachineid")
        if not vm_id:
            raise ApiError(
                431,
                f"Unable to execute API command {name} due to missing parameter virtualmachineid",
            )
        vm_id = _uuid_param("virtualmachineid", vm_id)
        extra = p.get("token") or None  # an empty extra is no extra
        if extra is not None and len(extra) > MAX_EXTRA_LENGTH:
            raise ApiError(431, f"Invalid parameter token: at most {MAX_EXTRA_LENGTH} characters")
        endpoint: Endpoint = await self._broker.create_endpoint(
            account, vm_id, extra, self._creator_address(request)
        )
        body: dict[str, Any] = {"success": endpoint.success, "result": endpoint.success}
        if endpoint.success:
            body["url"] = endpoint.url
            body["websocket"] = endpoint.websocket
        else:
            body["details"] = endpoint.details
        return 200, {"createconsoleendpointresponse": {"consoleendpoint": body}}

    async def _list_console_sessions(self, request, account, p, name):
        filters: dict[str, Any] = {"active_only": _bool_param("activeonly", p.get("activeonly"))}
        if p.get("virtualmachineid"):
            filters["vm_id"] = _uuid_param("virtualmachineid", p["virtualmachineid"])
        if p.get("id"):
            filters["session_id"] = _uuid_param("id", p["id"])
        if p.get("accountid") or p.get("account"):
            wanted = p.get("accountid") or p.get("account")
            try:
                target = await self._db.read(store.find_account, wanted)
            except store.NotFound:
                raise ApiError(431, "Invalid parameter account: no such account") from None
            if not account.is_admin and target.id != account.id:
                raise ApiError(431, "Invalid parameter account: no such account")
            filters["account_id"] = target.id
        records = await self._broker.list_sessions(account, **filters)
        return 200, {
            "listconsolesessionsresponse": {
                "count": len(records),
                "consolesession": [_session_json(r) for r in records],
            }
        }

    async def _end_console_session(self, request, account, p, name):
        if not p.get("id"):
            raise ApiError(431, f"Unable to execute API command {name} due to missing parameter id")
        session_id = _uuid_param("id", p["id"])
        ok, message = await self._broker.end_session_request(account, session_id)
        if not ok:
            raise ApiError(431, message)
        return 200, {"endconsolesessionresponse": {"success": True}}


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


def _check_admitted(result: Any) -> None:
    """Raise the 401 or 403 for a refusal of the broker's ``*_with_key`` methods."""
    if result is UNAUTHORIZED:
        raise _unauthorized()
    if result is FORBIDDEN:
        raise _source_not_allowed()


def _json_body(request: server.Request) -> dict[str, Any]:
    content = cast(BinaryIO, request.content)
    content.seek(0)
    raw = content.read(1024 * 1024 + 1)
    if len(raw) > 1024 * 1024:
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

    def __init__(self, broker: ConsoleBroker, metrics: ManagerMetrics):
        super().__init__()
        self._broker = broker
        self._metrics = metrics

    def render(self, request: server.Request) -> int:
        ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    async def _handle(self, request: server.Request) -> None:
        parts = [p.decode("utf-8", "replace") for p in cast("list[bytes]", request.postpath)]
        endpoint = "unknown"
        try:
            if parts[:1] != ["v1"]:
                raise ProxyApiError(404, "not_found", "no such endpoint")
            route = parts[1:]
            if route == ["redeem"]:
                endpoint = "redeem"
            elif route == ["heartbeat"]:
                endpoint = "heartbeat"
            elif len(route) == 3 and route[0] == "sessions" and route[2] == "end":
                endpoint = "end"
            else:
                raise ProxyApiError(404, "not_found", "no such endpoint")
            if request.method != b"POST":
                raise ProxyApiError(405, "method_not_allowed", "use POST")
            key = self._bearer_key(request)
            # The TCP peer, never X-Forwarded-For: a key's allowed networks are checked
            # against the address that really connected.
            peer = _peer(request)
            try:
                body = _json_body(request)
                if endpoint == "redeem":
                    call = self._redeem(key, body, peer)
                elif endpoint == "heartbeat":
                    call = self._heartbeat(key, body, peer)
                else:
                    call = self._end(key, route[1], body, peer)
            except ProxyApiError:
                # A caller without a valid key (or from outside its networks) is told so,
                # whatever its body holds.
                _check_admitted(await self._broker.authenticate_proxy(key, peer))
                raise
            # The key is checked in the same database transaction as the request.
            status, answer = await call
        except ProxyApiError as e:
            status, answer = e.status, {"error": e.code, "message": e.message}
            if e.status == 401:
                self._log.warn(
                    "proxy API {endpoint}: {message}",
                    endpoint=endpoint,
                    message=e.message,
                    client_address=_peer(request),
                )
        except Exception:
            self._log.failure("proxy API request failed", endpoint=endpoint)
            status, answer = 500, {"error": "internal_error", "message": "see the manager's log"}
        self._metrics.proxy_requests.labels(endpoint, str(status)).inc()
        _send_json(request, status, answer)

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

    def _redeem(self, key: str, body: dict, peer: str | None):
        token = _string(body, "token")
        extra = body.get("extra")
        if extra is not None and not isinstance(extra, str):
            raise _bad("extra must be a string or null")
        if extra == "":
            extra = None
        address = _string(body, "client_address", maximum=100)
        assert token is not None and address is not None
        worker = _int(body, "worker", 0, MAX_WORKER) if "worker" in body else 0
        return self._redeem_call(key, token, extra, address, worker, _instance(body), peer)

    async def _redeem_call(
        self,
        key: str,
        token: str,
        extra: str | None,
        address: str,
        worker: int,
        instance: str | None,
        peer: str | None,
    ):
        result = await self._broker.redeem_with_key(
            key, token, extra, address, worker, instance, peer
        )
        _check_admitted(result)
        if result.error is None:
            return 200, result.body
        return REDEEM_STATUS[result.error], {
            "error": result.error,
            "message": REDEEM_MESSAGE[result.error],
        }

    def _heartbeat(self, key: str, body: dict, peer: str | None):
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
            "capacity": _int(body, "capacity", 0, 10**7),
            "active_count": len(sessions),
            "version": _string(body, "version", optional=True, maximum=100),
            "ended": _ended_reports(body),
            "worker": _int(body, "worker", 0, MAX_WORKER) if "worker" in body else 0,
            # Absent (an older cpvm): no reconciliation against the list.
            "active_sessions": sessions if "active_sessions" in body else None,
            "instance": _instance(body),
            "peer": peer,
        }
        return self._heartbeat_call(key, beat, peer)

    async def _heartbeat_call(self, key: str, beat: dict, peer: str | None):
        answer = await self._broker.heartbeat_with_key(key, beat, peer)
        _check_admitted(answer)
        if isinstance(answer, instances.InstanceEvent):
            raise ProxyApiError(409, "instance_conflict", instances.CONFLICT_MESSAGE)
        return 200, answer

    def _end(self, key: str, session_id: str, body: dict, peer: str | None):
        return self._end_call(key, session_id, _end_report(body), peer)

    async def _end_call(self, key: str, session_id: str, report: dict, peer: str | None):
        try:
            session_id = str(uuid.UUID(session_id))
        except ValueError:
            # Unauthenticated callers get 401, not a hint about session ids.
            _check_admitted(await self._broker.authenticate_proxy(key, peer))
            raise ProxyApiError(404, "unknown_session", "no such session") from None
        found = await self._broker.report_end_with_key(key, session_id, report, peer)
        _check_admitted(found)
        if not found:
            raise ProxyApiError(404, "unknown_session", "not a session redeemed through this proxy")
        return 204, None


MAX_ENDED_PER_BEAT = 1000
MAX_DURATION = 10**9  # seconds (31 years) in an end report
MAX_WORKER = 1023


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
    if reason not in END_REASONS:
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
    return {
        "reason": reason,
        "client_address": _string(body, "client_address", optional=True, maximum=100),
        "bytes_to_client": _int(body, "bytes_to_client"),
        "bytes_to_server": _int(body, "bytes_to_server"),
        "duration": float(duration),
    }


_reports_log = Logger(namespace="cpvm.manager.web")


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


def _peer(request: http.Request) -> str | None:
    return getattr(request.getClientAddress(), "host", None)


class HealthResource(Resource):
    """``/healthz``: the process is alive."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class ReadyResource(Resource):
    """``/readyz``: the database answers ``SELECT 1`` through the pool."""

    isLeaf = True
    _log = Logger()

    def __init__(self, db: Database, reactor: Any, timeout: float = 5.0):
        super().__init__()
        self._db = db
        self._reactor = reactor
        self._timeout = timeout

    def render_GET(self, request: server.Request) -> int:
        @inlineCallbacks
        def check():
            try:
                yield self._db.ping().addTimeout(self._timeout, self._reactor)
            except Exception as e:
                self._log.warn("not ready: database unreachable: {error}", error=str(e))
                ok = False
            else:
                ok = True
            if _alive(request):
                request.setResponseCode(200 if ok else 503)
                request.setHeader(b"content-type", b"text/plain")
                request.write(b"ready\n" if ok else b"database unreachable\n")
                request.finish()

        check()
        return server.NOT_DONE_YET


class ManagerSite(LimitedSite):
    """A ``Site`` whose access log carries the path only: query strings hold apiKeys and
    signatures, so they never reach a log line. Bodies are capped and each request has
    a deadline (``limits``, see :mod:`cpvm.common.httplimits`)."""

    _log = Logger(namespace="cpvm.manager.access")
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        self._log.info(
            "{client_address} {method} {path} {status} {length}",
            client_address=_peer(request),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            status=request.code,
            length=request.sentLength,
        )


def build_site(
    broker: ConsoleBroker,
    db: Database,
    box: SecretBox,
    clock: Any,
    trusted_proxies: tuple[IPNetwork, ...],
    metrics: ManagerMetrics,
    metrics_allow: tuple[IPNetwork, ...] | None,
    reactor: Any,
    expiry: signing.ExpiryPolicy = signing.ExpiryPolicy(),
    create_limiter: KeyedRateLimiter | None = None,
    limits: HttpLimits = HttpLimits(max_body=1024 * 1024, request_deadline=60.0),
) -> ManagerSite:
    """The resource tree of the manager."""
    root = Resource()
    client = Resource()
    client.putChild(
        b"api",
        PublicApiResource(broker, db, box, clock, trusted_proxies, metrics, expiry, create_limiter),
    )
    root.putChild(b"client", client)
    root.putChild(b"proxy", ProxyApiResource(broker, metrics))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(db, reactor))
    if metrics_allow is not None:
        root.putChild(b"metrics", MetricsPage(metrics.registry, metrics_allow))
    site = ManagerSite(root, limits=limits, timeout=60, reactor=reactor)
    return site
