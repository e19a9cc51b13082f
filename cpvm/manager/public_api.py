"""``/client/api``: the public CloudStack-style API. Parses and checks parameters, finds
the command, renders the JSON answers; who is calling is decided by
:class:`cpvm.manager.auth.ApiAuthenticator`, everything else by
:class:`cpvm.manager.consoles.ConsoleBroker` and the VM commands of
:mod:`cpvm.manager.vm_api`.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qs

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cpvm.common.addresses import client_address
from cpvm.common.contract import MAX_EXTRA_LENGTH
from cpvm.common.ratelimit import KeyedRateLimiter
from cpvm.manager import signing
from cpvm.manager.api_errors import ApiError
from cpvm.manager.auth import ApiAuthenticator
from cpvm.manager.config import IPNetwork
from cpvm.manager.consoles import ConsoleBroker, Endpoint, SessionRecord
from cpvm.manager.json_http import alive, send_json
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.params import ParamError, parse_params

# A command handler: ``handler(request, account, lower-cased params, command name)`` gives
# ``(status, body)`` or raises ApiError (cpvm/manager/vm_api.py has the VM commands).
CommandHandler = Callable[..., Any]


def _throttled(wait: float) -> ApiError:
    # CloudStack's own answer when api.throttling is on (errorcode 429, API_LIMIT_EXCEED).
    ms = max(1, math.ceil(wait * 1000))
    return ApiError(
        429,
        f"The given user has reached his/her account api limit, please retry after {ms} ms. "
        "(createConsoleEndpoint is rate-limited per API key)",
        retry_after=wait,
    )


def _session_json(r: SessionRecord) -> dict[str, Any]:
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
        # How often a redeemed session was resumed (docs/architecture.md section 7).
        "reconnects": r.reconnects if r.acquired_at is not None else None,
        "terminaterequested": (
            signing.format_time(r.terminate_requested_at)
            if r.terminate_requested_at is not None
            else None
        ),
        "viewonly": True if r.view_only else None,  # a cpvm extension
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
    for name in (
        "createConsoleEndpoint",
        "listConsoleSessions",
        "endConsoleSession",
        "createConsoleRecordingPlayback",
    )
}


class PublicApiResource(Resource):
    """``/client/api``: CloudStack-compatible, signed, JSON only."""

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        broker: ConsoleBroker,
        authenticator: ApiAuthenticator,
        clock: Any,
        trusted_proxies: tuple[IPNetwork, ...],
        metrics: ManagerMetrics,
        create_limiter: KeyedRateLimiter | None = None,
        more_commands: dict[str, CommandHandler] | None = None,
        recordings: Callable[[list[str]], Any] | None = None,
    ):
        super().__init__()
        self._broker = broker
        self._authenticator = authenticator
        self._trusted = trusted_proxies
        self._metrics = metrics
        self._create_limiter = (
            create_limiter if create_limiter is not None else KeyedRateLimiter(0, 1, clock)
        )
        self._commands: dict[str, CommandHandler] = {
            "createconsoleendpoint": self._create_console_endpoint,
            "listconsolesessions": self._list_console_sessions,
            "endconsolesession": self._end_console_session,
        }
        # listVirtualMachines and the admin VM commands (cpvm/manager/vm_api.py),
        # createConsoleRecordingPlayback (cpvm/manager/recording_api.py).
        self._commands.update(more_commands or {})
        # Session id -> what the manager knows of its recording, for listConsoleSessions.
        self._recordings = recordings

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
            if e.retry_after is not None and alive(request):
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
        send_json(request, status, body)

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
        account = await self._authenticator.authenticate(params, lower)
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
        view_only = _bool_param("viewonly", p.get("viewonly"))
        endpoint: Endpoint = await self._broker.create_endpoint(
            account, vm_id, extra, self._creator_address(request), view_only
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
            target = await self._broker.find_account(wanted)
            if target is None or (not account.is_admin and target.id != account.id):
                raise ApiError(431, "Invalid parameter account: no such account")
            filters["account_id"] = target.id
        records = await self._broker.list_sessions(account, **filters)
        recorded = await self._recordings([r.id for r in records]) if self._recordings else {}
        sessions = []
        for r in records:
            item = _session_json(r)
            recording = recorded[r.id].listing() if r.id in recorded else None
            if recording is not None:
                item["recording"] = recording
            sessions.append(item)
        return 200, {
            "listconsolesessionsresponse": {"count": len(records), "consolesession": sessions}
        }

    async def _end_console_session(self, request, account, p, name):
        if not p.get("id"):
            raise ApiError(431, f"Unable to execute API command {name} due to missing parameter id")
        session_id = _uuid_param("id", p["id"])
        ok, message = await self._broker.end_session_request(account, session_id)
        if not ok:
            raise ApiError(431, message)
        return 200, {"endconsolesessionresponse": {"success": True}}
