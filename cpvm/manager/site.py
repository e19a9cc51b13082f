"""The manager's resource tree: the public API, the proxy API, health, readiness and
metrics, in a ``Site`` whose access log never holds a query string.

The resources get their logic ready-made (broker, authenticator, VM commands, the
readiness check): the database is the wiring's business (:func:`cpvm.manager.tap.manager_site`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource

from cpvm.common.httplimits import HttpLimits, LimitedSite
from cpvm.common.metrics import MetricsPage
from cpvm.common.ratelimit import KeyedRateLimiter
from cpvm.manager import recording_api
from cpvm.manager.auth import ApiAuthenticator
from cpvm.manager.config import IPNetwork
from cpvm.manager.consoles import ConsoleBroker
from cpvm.manager.json_http import alive, tcp_peer
from cpvm.manager.legacy_console import LegacyConsoleResource
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_api import ProxyApiResource
from cpvm.manager.public_api import CommandHandler, PublicApiResource
from cpvm.manager.recording_api import PlaybackBroker

DEFAULT_LIMITS = HttpLimits(max_body=1024 * 1024, request_deadline=60.0)


class HealthResource(Resource):
    """``/healthz``: the process is alive."""

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok\n"


class ReadyResource(Resource):
    """``/readyz``: ``ping()`` (the database's ``SELECT 1`` through its pool) answers in
    time."""

    isLeaf = True
    _log = Logger()

    def __init__(self, ping: Callable[[], Deferred], reactor: Any, timeout: float = 5.0):
        super().__init__()
        self._ping = ping
        self._reactor = reactor
        self._timeout = timeout

    def render_GET(self, request: server.Request) -> int:
        ensureDeferred(self._check(request))
        return server.NOT_DONE_YET

    async def _check(self, request: server.Request) -> None:
        try:
            await self._ping().addTimeout(self._timeout, self._reactor)
        except Exception as e:
            self._log.warn("not ready: database unreachable: {error}", error=str(e))
            ok = False
        else:
            ok = True
        if alive(request):
            request.setResponseCode(200 if ok else 503)
            request.setHeader(b"content-type", b"text/plain")
            request.write(b"ready\n" if ok else b"database unreachable\n")
            request.finish()


class ManagerSite(LimitedSite):
    """A ``Site`` whose access log carries the path only: query strings hold apiKeys and
    signatures, so they never reach a log line. Bodies are capped and each request has
    a deadline (``limits``, see :mod:`cpvm.common.httplimits`)."""

    _log = Logger(namespace="cpvm.manager.access")
    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        self._log.info(
            "{client_address} {method} {path} {status} {length}",
            client_address=tcp_peer(request),
            method=request.method.decode("ascii", "replace"),
            path=request.path.decode("utf-8", "replace"),
            status=request.code,
            length=request.sentLength,
        )


def build_site(
    broker: ConsoleBroker,
    authenticator: ApiAuthenticator,
    ping: Callable[[], Deferred],
    clock: Any,
    trusted_proxies: tuple[IPNetwork, ...],
    metrics: ManagerMetrics,
    metrics_allow: tuple[IPNetwork, ...] | None,
    reactor: Any,
    *,
    vm_commands: dict[str, CommandHandler] | None = None,
    create_limiter: KeyedRateLimiter | None = None,
    limits: HttpLimits = DEFAULT_LIMITS,
    spend_signature: Callable[[str, float], Awaitable[bool]] | None = None,
    playback: PlaybackBroker | None = None,
) -> ManagerSite:
    """The resource tree of the manager; ``/client/console`` (the legacy console URL)
    only with ``spend_signature``, which makes each of its signed URLs work once;
    recording playback (docs/recording.md) with ``playback``."""
    commands = dict(vm_commands or {})
    if playback is not None:
        commands.update(recording_api.commands(playback))
    root = Resource()
    client = Resource()
    limiter = create_limiter if create_limiter is not None else KeyedRateLimiter(0, 1, clock)
    client.putChild(
        b"api",
        PublicApiResource(
            broker,
            authenticator,
            clock,
            trusted_proxies,
            metrics,
            limiter,
            commands,
            recordings=playback.recordings_of if playback is not None else None,
        ),
    )
    if spend_signature is not None:
        client.putChild(
            b"console",
            LegacyConsoleResource(
                authenticator=authenticator,
                broker=broker,
                spend=spend_signature,
                limiter=limiter,
                trusted_proxies=trusted_proxies,
                metrics=metrics,
            ),
        )
    root.putChild(b"client", client)
    root.putChild(b"proxy", ProxyApiResource(broker.proxies, metrics, playback))
    root.putChild(b"healthz", HealthResource())
    root.putChild(b"readyz", ReadyResource(ping, reactor))
    if metrics_allow is not None:
        root.putChild(b"metrics", MetricsPage(metrics.registry, metrics_allow))
    return ManagerSite(root, limits=limits, timeout=60, reactor=reactor)
