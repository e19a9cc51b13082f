"""cpvm's client for the manager's proxy API (``docs/management-api.md``): redemption
and heartbeats (which also carry session end reports).

One treq ``HTTPClient`` over cpvm's own persistent connection pool, a timeout on every
call, cpvm's proxy key on every request, and a cap on the size of every answer: the
manager is trusted, but a broken or impostor one must not take cpvm down with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, cast

from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from cpvm.common.contract import (
    REDEMPTION_ERRORS,
    VNC_TLS_MODES,
    Outcome,
    ViewerPolicy,
    vnc_shared_flag,
)
from cpvm.proxy.http_bodies import BytesBody, TooBig, read_limited
from cpvm.proxy.recording.tickets import redeem_playback

MAX_ANSWER = 256 * 1024


class ManagerUnavailable(Exception):
    """The manager could not be reached or gave an answer cpvm cannot use."""


class InstanceConflict(ManagerUnavailable):
    """The manager refused a heartbeat: the proxy key is bound to another live instance."""


class RedemptionRefused(Exception):
    """The manager refused a token; ``outcome`` is what the browser is told."""

    def __init__(self, outcome: Outcome, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.outcome = outcome
        self.error = error
        self.message = message


@dataclass(frozen=True)
class VncTarget:
    """Where and how to reach the VM's VNC server."""

    host: str
    port: int
    password: bytes | None
    tls: str
    ca_pem: bytes | None
    server_name: str | None

    def __repr__(self) -> str:
        # Keep the password out of any repr that might reach a log line.
        return f"VncTarget(host={self.host!r}, port={self.port}, tls={self.tls!r})"


@dataclass(frozen=True)
class Redemption:
    """A redeemed token: the session the manager recorded and its VNC target."""

    session_id: str
    vm_id: str
    vm_name: str
    account: str | None
    vnc: VncTarget
    idle_timeout: float | None
    max_duration: float | None
    #: The browser may only watch: cpvm drops its input (cpvm.rfb.ViewOnlyFilter).
    view_only: bool = False
    #: The VM's viewer policy, which decides the VNC shared flag.
    viewer_policy: ViewerPolicy = ViewerPolicy.SHARED
    #: Sessions this one took over (policy "takeover"): end them with close code 4023.
    taken_over: tuple[str, ...] = ()
    #: How often this session was resumed before (0: a first redemption); cpvm echoes it
    #: in the end report so the manager can tell a late report of an earlier connection.
    reconnects: int = 0
    #: The manager's policy says this session is recorded (docs/recording.md).
    recording: bool = False

    def vnc_shared_flag(self, requested: bool) -> bool:
        """The ClientInit shared flag towards the VNC server (see the contract's rule)."""
        return vnc_shared_flag(self.viewer_policy, self.view_only, requested)


def parse_redemption(body: Any) -> Redemption:
    """Validate the manager's success answer; ``ValueError`` says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("answer is not a JSON object")
    session_id = _string(body, "session_id")
    vm = body.get("vm")
    vnc = body.get("vnc")
    if not isinstance(vm, dict) or not isinstance(vnc, dict):
        raise ValueError("answer lacks the 'vm' or 'vnc' object")
    port = vnc.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError("vnc.port is not a TCP port")
    tls = vnc.get("tls", "none")
    if tls not in VNC_TLS_MODES:
        raise ValueError(f"vnc.tls must be one of {VNC_TLS_MODES}")
    password = vnc.get("password")
    if password is not None and not isinstance(password, str):
        raise ValueError("vnc.password is not a string")
    ca_pem = vnc.get("ca_pem")
    if ca_pem is not None and not isinstance(ca_pem, str):
        raise ValueError("vnc.ca_pem is not a string")
    server_name = vnc.get("server_name")
    if server_name is not None and not isinstance(server_name, str):
        raise ValueError("vnc.server_name is not a string")
    limits = body.get("limits") or {}
    if not isinstance(limits, dict):
        raise ValueError("limits is not an object")
    account = body.get("account")
    try:
        policy = ViewerPolicy(body.get("viewer_policy") or "shared")
    except ValueError:
        raise ValueError("viewer_policy is not a known policy") from None
    taken_over = body.get("taken_over") or []
    if not isinstance(taken_over, list) or not all(
        isinstance(s, str) and 0 < len(s) <= 1024 for s in taken_over
    ):
        raise ValueError("taken_over is not a list of session ids")
    return Redemption(
        session_id=session_id,
        vm_id=_string(vm, "id"),
        vm_name=str(vm.get("name") or ""),
        account=account if isinstance(account, str) else None,
        vnc=VncTarget(
            host=_string(vnc, "host"),
            port=port,
            password=password.encode("utf-8") if password is not None else None,
            tls=tls,
            ca_pem=ca_pem.encode("ascii") if ca_pem else None,
            server_name=server_name,
        ),
        idle_timeout=_seconds(limits, "idle_timeout"),
        max_duration=_seconds(limits, "max_duration"),
        reconnects=_count(body, "reconnects"),
        view_only=_flag(body, "view_only"),
        viewer_policy=policy,
        taken_over=tuple(taken_over),
        recording=_flag(body, "recording"),
    )


def _count(obj: dict, key: str) -> int:
    value = obj.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is not a count")
    return value


def _flag(obj: dict, key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} is not true or false")
    return value


def _string(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ValueError(f"{key} is missing or not a string")
    return value


def _seconds(obj: dict, key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"limits.{key} is not a number of seconds")
    return float(value)


def proxy_key_id(credential: str | None) -> str:
    """The public part of a ``cpvmk_<id>.<secret>`` key, fit for log lines."""
    if credential and credential.startswith("cpvmk_") and "." in credential:
        key_id = credential[len("cpvmk_") :].partition(".")[0]
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", key_id):
            return key_id
    return "(unnamed)" if credential else "(none)"


class ManagerClient:
    """Calls the manager's proxy API: redeem tokens, heartbeat (with session end reports)."""

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        base_url: str,
        credential: str | None,
        timeout: float,
        http: HTTPClient | None = None,
        contextFactory: Any = None,
        worker: int = 0,
        instance: str | None = None,
    ):
        self._reactor = reactor
        # Which running cpvm this is (cpvm/proxy/instance.py): the manager lets one instance at
        # a time use a proxy key.
        self._instance = instance
        self.key_id = proxy_key_id(credential)
        # Which worker process of this proxy we are: the manager reconciles each worker's
        # sessions with that worker's heartbeats.
        self._worker = worker
        self._base = base_url.rstrip("/")
        self._urls: dict[str, EncodedURL] = {}
        self._timeout = timeout
        # The type treq's headers parameter takes (a dict: invariant in keys and values).
        self._headers: dict[bytes | str, list[bytes | str]] = {
            b"Content-Type": [b"application/json"]
        }
        if credential:
            self._headers[b"Authorization"] = [b"Bearer " + credential.encode("ascii")]
        if http is None:
            self.pool: HTTPConnectionPool | None = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = 8
            kwargs = {"pool": self.pool, "connectTimeout": timeout}
            if contextFactory is not None:
                kwargs["contextFactory"] = contextFactory
            http = HTTPClient(Agent(reactor, **kwargs), data_to_body_producer=BytesBody)
        else:
            self.pool = None
        self._http = http

    def close(self) -> Deferred:
        """Drop idle persistent connections (at shutdown)."""
        if self.pool is None:
            return Deferred.fromCoroutine(_noop())
        return self.pool.closeCachedConnections()

    def redeem(
        self,
        token: str,
        extra: str | None,
        client_address: str,
        browser_hash: str | None = None,
    ) -> Deferred:
        """Redeem ``token`` for the browser whose console cookie hashes to
        ``browser_hash`` (cpvm/proxy/browser_cookie.py): fires with a ``Redemption`` or
        fails with ``RedemptionRefused`` or ``ManagerUnavailable``."""
        return ensureDeferred(self._redeem(token, extra, client_address, browser_hash))

    async def _redeem(
        self, token: str, extra: str | None, client_address: str, browser_hash: str | None
    ) -> Redemption:
        request = {
            "token": token,
            "extra": extra,
            "client_address": client_address,
            "worker": self._worker,
            "instance": self._instance,
        }
        if browser_hash is not None:
            request["browser_hash"] = browser_hash
        status, body = await self._post("/proxy/v1/redeem", request)
        if status == 200:
            try:
                return parse_redemption(body)
            except ValueError as e:
                raise ManagerUnavailable(f"malformed redemption answer: {e}") from None
        error = body.get("error") if isinstance(body, dict) else None
        message = body.get("message") if isinstance(body, dict) else None
        outcome = REDEMPTION_ERRORS.get(error) if isinstance(error, str) else None
        if outcome is None or status >= 500 or status == 401:
            raise ManagerUnavailable(f"manager answered HTTP {status} ({error or 'no error code'})")
        # A known outcome means error is a string.
        raise RedemptionRefused(outcome, cast(str, error), str(message or "")[:200])

    def redeem_playback(self, ticket: str) -> Deferred:
        """Redeem a one-time playback ticket (cpvm.proxy.recording.tickets): fires with the
        session id whose recording it opens, or fails with ``PlaybackRefused``."""
        return ensureDeferred(redeem_playback(self._post, ticket, self._instance))

    def heartbeat(self, payload: dict) -> Deferred:
        """Send a heartbeat; fires with the manager's answer (a dict)."""
        return ensureDeferred(self._heartbeat(payload))

    async def _heartbeat(self, payload: dict) -> dict:
        status, body = await self._post(
            "/proxy/v1/heartbeat", {**payload, "worker": self._worker, "instance": self._instance}
        )
        if status == 409 and isinstance(body, dict) and body.get("error") == "instance_conflict":
            raise InstanceConflict(
                f"proxy key {self.key_id} is in use by another running "
                "cpvm instance (HTTP 409 instance_conflict)"
            )
        if status != 200 or not isinstance(body, dict):
            raise ManagerUnavailable(f"heartbeat answered HTTP {status}")
        return body

    async def _post(self, path: str, payload: dict) -> tuple[int, Any]:
        # One deadline for the whole exchange (headers and body), so a redemption never
        # takes longer than [manager] timeout.
        d = ensureDeferred(self._exchange(path, payload))
        d.addTimeout(self._timeout, self._reactor)
        try:
            return await d
        except (TimeoutError, CancelledError):
            raise ManagerUnavailable(f"no answer within {self._timeout:g} s") from None

    async def _exchange(self, path: str, payload: dict) -> tuple[int, Any]:
        data = json.dumps(payload).encode("utf-8")
        try:
            # No redirects: the manager's answer is final, and following one would send
            # the token and cpvm's proxy key wherever a Location header pointed.
            # Unbuffered: the body is read once, with a size cap, below.
            response = await self._http.post(
                self._url(path),
                data=data,
                headers=self._headers,
                allow_redirects=False,
                unbuffered=True,
            )
            raw = await read_limited(response, MAX_ANSWER)
        except CancelledError:
            raise
        except TooBig:
            raise ManagerUnavailable(f"answer larger than {MAX_ANSWER} bytes") from None
        except Exception as e:  # refused, reset, DNS, TLS verification …
            raise ManagerUnavailable(f"cannot reach the manager: {type(e).__name__}") from None
        if not raw:
            return response.code, None
        try:
            return response.code, json.loads(raw)
        except ValueError:
            # Not JSON: callers treat a missing body as "unusable answer".
            return response.code, None

    def _url(self, path: str) -> EncodedURL:
        # Parsed once per path: treq would otherwise parse the URL text on every call.
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = EncodedURL.from_text(self._base + path)
        return url


async def _noop() -> None:
    return None
