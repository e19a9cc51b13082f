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

import treq
from hyperlink import EncodedURL
from treq.client import HTTPClient
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    ensureDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from cpvm.common.contract import (
    REDEMPTION_ERRORS,
    VNC_TLS_MODES,
    Outcome,
    ViewerPolicy,
    vnc_shared_flag,
)

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
    view_only = body.get("view_only", False)
    if not isinstance(view_only, bool):
        raise ValueError("view_only is not a boolean")
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
        view_only=view_only,
        viewer_policy=policy,
        taken_over=tuple(taken_over),
    )


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

    def redeem(self, token: str, extra: str | None, client_address: str) -> Deferred:
        """Redeem ``token``: fires with a ``Redemption`` or fails with ``RedemptionRefused``
        or ``ManagerUnavailable``."""
        return ensureDeferred(self._redeem(token, extra, client_address))

    async def _redeem(self, token: str, extra: str | None, client_address: str) -> Redemption:
        status, body = await self._post(
            "/proxy/v1/redeem",
            {
                "token": token,
                "extra": extra,
                "client_address": client_address,
                "worker": self._worker,
                "instance": self._instance,
            },
        )
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
            raw = await _read_limited(response, MAX_ANSWER)
        except CancelledError:
            raise
        except _TooBig:
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


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory, written at once.

    treq's default wraps bytes in a ``FileBodyProducer``, which writes them from a
    ``Cooperator`` task on a later reactor turn: a turn and a timer per call for a
    body of a few hundred bytes.
    """

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred:  # noqa: N802
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:  # noqa: N802
        pass

    def resumeProducing(self) -> None:  # noqa: N802
        pass

    def stopProducing(self) -> None:  # noqa: N802
        pass


class _TooBig(Exception):
    pass


def _read_limited(response: Any, limit: int) -> Deferred:
    """Collect a response body, failing as soon as it exceeds ``limit`` bytes."""
    chunks: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise _TooBig()
        chunks.append(data)

    d = treq.collect(response, collect)
    d.addCallback(lambda _: b"".join(chunks))
    return d


async def _noop() -> None:
    return None
