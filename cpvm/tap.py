"""``twistd cpvm``: options and the one place where cpvm's services are built."""

from __future__ import annotations

import os

from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.python import usage

from cpvm import __version__
from cpvm.config import DEFAULT_CONFIG_PATH, ConfigError, CpvmConfig, load_config
from cpvm.manager_client import ManagerClient
from cpvm.metrics import ProxyMetrics
from cpvm.registry import ConsoleSessions, Heartbeat
from cpvm.tls import ReloadableServerTLS, manager_tls_policy
from cpvm.web import ConsoleSite, build_root
from cpvm.websocket import ConsoleWebSocketFactory

log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd cpvm``: only where the configuration lives."""

    optParameters = [
        ["config", "c", None,
         f"Configuration file (default {DEFAULT_CONFIG_PATH} when it exists, "
         "else the embedded defaults)."],
    ]

    def postOptions(self):  # noqa: N802
        path = self["config"]
        if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
            path = DEFAULT_CONFIG_PATH
        try:
            self["parsed"] = load_config(path)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class ProxyService(service.MultiService):
    """cpvm as one service: listening port, heartbeat, graceful stop, TLS reload."""

    def __init__(self, config: CpvmConfig, sessions: ConsoleSessions,
                 manager: ManagerClient, tls: ReloadableServerTLS | None):
        super().__init__()
        self.config = config
        self.sessions = sessions
        self.manager = manager
        self.tls = tls

    def stopService(self):  # noqa: N802
        # Stop listening first (children stop), then drain the sessions within the grace.
        d = super().stopService()
        d.addCallback(lambda _: self.sessions.shutdown(self.config.server.grace_period))
        d.addCallback(lambda _: self.manager.close())
        return d

    def reload_tls(self) -> None:
        if self.tls is not None:
            self.tls.reload()


def build_service(config: CpvmConfig, reactor) -> ProxyService:
    """Everything cpvm runs, from a parsed configuration."""
    server = config.server
    metrics = ProxyMetrics()
    manager = ManagerClient(
        reactor, config.manager.url, config.manager.credential, config.manager.timeout,
        contextFactory=manager_tls_policy(config.manager.ca_file)
        if config.manager.url.startswith("https:") else None,
    )
    sessions = ConsoleSessions(reactor, config, manager, metrics)
    heartbeat = Heartbeat(reactor, manager, sessions, config.manager.heartbeat_interval)
    ws_factory = ConsoleWebSocketFactory(
        sessions=sessions,
        scheme="https" if server.tls else "http",
        allowed_origins=server.allowed_origins,
        trusted_proxies=server.trusted_proxies,
        open_handshake_timeout=config.session.websocket_handshake_timeout,
        max_message_size=config.session.max_message_size,
        server_name="cpvm",
    )

    def readiness():
        if not sessions.accepting:
            return False, "shutting down"
        if not heartbeat.manager_reachable:
            return False, "manager not reachable"
        return True, f"{len(sessions)} session(s)"

    root = build_root(novnc_dir=server.novnc_dir, websocket_factory=ws_factory,
                      metrics=metrics.registry, readiness=readiness)
    site = ConsoleSite(root)
    tls = None
    if server.tls:
        tls = ReloadableServerTLS(server.certificate, server.private_key, server.chain)
        endpoint = endpoints.SSL4ServerEndpoint(reactor, server.port, tls,
                                                interface=server.bind)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, server.port, interface=server.bind)
    top = ProxyService(config, sessions, manager, tls)
    listener = internet.StreamServerEndpointService(endpoint, site)
    # A port that cannot be bound must stop start-up, not be logged and forgotten.
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    beat = internet.TimerService(config.manager.heartbeat_interval, heartbeat.beat)
    beat.clock = reactor
    beat.setServiceParent(top)
    top.listener = listener  # type: ignore[attr-defined]
    top.heartbeat = heartbeat  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    log.info("cpvm {version} configured from {path}: {scheme} on {bind}:{port}",
             version=__version__, path=config.path, scheme=server.scheme, bind=server.bind,
             port=server.port)
    return top


def makeService(options: Options):  # noqa: N802 (twistd's name)
    from twisted.internet import reactor

    svc = build_service(options["parsed"], reactor)
    _install_signal_handlers(reactor, svc)
    return svc


def _install_signal_handlers(reactor, svc: ProxyService) -> None:
    import signal

    def on_hup(signum, frame):
        reactor.callFromThread(svc.reload_tls)

    signal.signal(signal.SIGHUP, on_hup)
