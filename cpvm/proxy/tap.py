"""``twistd cpvm``: options and the one place where cpvm's services are built."""

from __future__ import annotations

import os
import sys
from typing import cast

from twisted.application import internet, service
from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from cpvm import __version__
from cpvm.common import logs
from cpvm.common.httplimits import HttpLimits
from cpvm.common.metrics import MetricsPage
from cpvm.common.tls import ReloadableServerTLS, TLSFilesError, manager_tls_policy
from cpvm.proxy import metrics as metrics_module
from cpvm.proxy.config import DEFAULT_CONFIG_PATH, ConfigError, CpvmConfig, load_config
from cpvm.proxy.headers import SecurityHeaders
from cpvm.proxy.heartbeat import Heartbeat
from cpvm.proxy.instance import instance_id_for
from cpvm.proxy.manager_client import ManagerClient
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.recording.player import PLAYER_PATH, build_player
from cpvm.proxy.recording.service import Recordings
from cpvm.proxy.recording.sessions import SessionRecordings
from cpvm.proxy.registry import RegistrySettings, SessionRegistry
from cpvm.proxy.session import SessionLimits
from cpvm.proxy.web import ConsoleSite, build_root
from cpvm.proxy.websocket import ConsoleWebSocketFactory
from cpvm.proxy.workers import ReusePortEndpoint, WorkerPool

log = Logger()


class Options(usage.Options):
    """Command-line options of ``twistd cpvm``: only where the configuration lives."""

    optParameters = [
        [
            "config",
            "c",
            None,
            f"Configuration file (default {DEFAULT_CONFIG_PATH} when it exists, "
            "else the embedded defaults).",
        ],
        [
            "worker",
            None,
            None,
            "Internal: run as worker N of a multi-process cpvm (started by the first process).",
            int,
        ],
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

    def __init__(
        self,
        config: CpvmConfig,
        sessions: SessionRegistry,
        manager: ManagerClient,
        heartbeat: Heartbeat,
        tls: ReloadableServerTLS | None,
        metrics: ProxyMetrics,
    ):
        super().__init__()
        self.config = config
        self.sessions = sessions
        self.manager = manager
        self.heartbeat = heartbeat
        self.tls = tls
        self.metrics = metrics
        self.workers: WorkerPool | None = None  # the first of several processes only

    def stopService(self):  # noqa: N802
        # Stop listening and beating first (children stop), end the sessions (1001), then
        # one last heartbeat carries their end reports, within the grace period.
        d = super().stopService()
        d.addCallback(lambda _: self.sessions.shutdown())
        d.addCallback(lambda _: self.heartbeat.flush(self.config.server.grace_period))
        d.addCallback(lambda _: self.manager.close())
        shared = self.metrics.shared_directory if self.workers is not None else None
        if shared:
            # The first process, after its workers exited: nobody writes there any more.
            d.addBoth(lambda r: (metrics_module.remove_shared_directory(shared), r)[1])
        return d

    def reload_tls(self) -> None:
        """SIGHUP: re-read the certificate here, and have every worker re-read its own."""
        try:
            if self.tls is not None:
                self.tls.reload()  # logs and keeps the old pair when the files are bad
        finally:
            # Even then: each worker reads the files for itself and keeps its own old pair.
            if self.workers is not None:
                self.workers.signal_all("HUP")


def worker_argv(argv: list[str]) -> list[str]:
    """The command line of an extra worker: our own twistd command line, without pid file
    or daemonizing (the first process owns those)."""
    args = list(argv[1:])
    takes_value = _twistd_options_with_values()
    split, i = len(args), 0
    while i < len(args):
        if args[i] == "cpvm":
            split = i
            break
        # "--reactor cpvm", "-r cpvm", "--pidfile PATH": the next word is a value.
        i += 2 if args[i] in takes_value else 1
    twistd_options: list[str] = []
    i = 0
    while i < split:
        if args[i] == "--pidfile":
            i += 2
            continue
        if not args[i].startswith("--pidfile="):
            twistd_options.append(args[i])
        i += 1
    plugin = args[split:] or ["cpvm"]
    return [
        "-c",
        "from twisted.scripts.twistd import run; run()",
        *twistd_options,
        "--nodaemon",
        "--pidfile=",
        *plugin,
    ]


def _twistd_options_with_values() -> set[str]:
    """twistd's own options that take a value (``--name value`` or ``-x value``)."""
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    names = {"--" + name[:-1] for name in options.longOpt if name.endswith("=")}
    short = options.shortOpt
    names |= {"-" + c for i, c in enumerate(short) if i + 1 < len(short) and short[i + 1] == ":"}
    return names


def build_service(config: CpvmConfig, reactor, worker: int | None = None) -> ProxyService:
    """Everything cpvm runs, from a parsed configuration (``worker``: index of an extra
    worker process, which shares the port and starts no workers itself)."""
    server = config.server
    shared = _shared_metrics_directory(config, worker)
    metrics = ProxyMetrics(shared_directory=shared)
    instance_id = _instance_id(config, worker)
    manager = ManagerClient(
        reactor,
        config.manager.url,
        config.manager.credential,
        config.manager.timeout,
        contextFactory=manager_tls_policy(config.manager.ca_file)
        if config.manager.url.startswith("https:")
        else None,
        worker=worker or 0,
        instance=instance_id,
    )
    recordings = Recordings.from_config(config.recording, reactor)
    sessions = SessionRegistry(
        reactor,
        registry_settings(config),
        manager,
        metrics,
        recordings=SessionRecordings(recordings, reactor, metrics),
    )
    heartbeat = Heartbeat(reactor, manager, sessions, config.manager.heartbeat_interval)
    sessions.ends.on_unclean = heartbeat.soon  # a resumable end reaches the manager at once
    site = _site(config, reactor, sessions, heartbeat, manager, metrics)
    endpoint, tls = _listening_endpoint(config, reactor, worker)
    top = ProxyService(config, sessions, manager, heartbeat, tls, metrics)
    if server.workers > 1 and worker is None:
        # Here shared is the directory _shared_metrics_directory() made above.
        pool = WorkerPool(
            reactor,
            server.workers,
            worker_argv(sys.argv),
            server.grace_period,
            on_exit=lambda pid: metrics_module.process_gone(cast(str, shared), pid),
        )
        pool.setServiceParent(top)
        top.workers = pool
    listener = internet.StreamServerEndpointService(endpoint, site)
    # A port that cannot be bound must stop start-up, not be logged and forgotten.
    listener._raiseSynchronously = True
    listener.setServiceParent(top)
    heartbeat.setServiceParent(top)
    recordings.setServiceParent(top)  # started in the same turn: before any session
    top.listener = listener  # type: ignore[attr-defined]
    log.info(
        "cpvm {version} configured from {path}: {scheme} on {bind}:{port}, instance {instance}",
        version=__version__,
        path=config.path,
        scheme=server.scheme,
        bind=server.bind,
        port=server.port,
        instance=instance_id,
    )
    return top


def _shared_metrics_directory(config: CpvmConfig, worker: int | None) -> str | None:
    """With several workers, the directory every process keeps its metric values in:
    made by the first process, inherited by the workers through the environment."""
    if config.server.workers <= 1:
        return None
    try:
        shared = (
            metrics_module.create_shared_directory()
            if worker is None
            else os.environ.get(metrics_module.SHARED_DIR_ENV)
        )
    except OSError as e:
        raise ConfigError(
            config.path,
            "server",
            "workers",
            f"cannot create the workers' shared metrics directory: {e}",
        ) from None
    if shared:
        metrics_module.use_shared_directory(shared)
    return shared


def _instance_id(config: CpvmConfig, worker: int | None) -> str:
    try:
        # Before any worker starts: they inherit it (cpvm/proxy/instance.py).
        return instance_id_for(config.server.state_directory, worker)
    except OSError as e:
        raise ConfigError(
            config.path, "server", "state_directory", f"cannot keep the instance id there: {e}"
        ) from None


def registry_settings(config: CpvmConfig) -> RegistrySettings:
    """What the session registry needs of ``config`` (reads the default VNC CA file)."""
    server, session, vnc = config.server, config.session, config.vnc
    return RegistrySettings(
        limits=SessionLimits(
            # A session's set-up includes its token redemption.
            handshake_timeout=vnc.handshake_timeout + config.manager.timeout,
            idle_timeout=session.idle_timeout,
            max_duration=session.max_duration,
            shared=session.shared,
        ),
        max_sessions=session.max_sessions,
        max_pending=session.max_pending,
        failed_redemption_burst=session.failed_redemption_burst,
        failed_redemption_rate=session.failed_redemption_rate,
        connect_timeout=vnc.connect_timeout,
        allow_anonymous_tls=vnc.allow_anonymous_tls,
        default_ca_pem=vnc.ca_file.read_bytes() if vnc.ca_file else None,
        public_host=server.public_host,
        public_port=server.public_port,
        tls=server.tls,
        public_address=server.public_address or None,
        capacity=session.max_sessions * server.workers,
    )


def _site(
    config: CpvmConfig,
    reactor,
    sessions: SessionRegistry,
    heartbeat: Heartbeat,
    manager: ManagerClient,
    metrics: ProxyMetrics,
) -> ConsoleSite:
    """The whole HTTP side: noVNC, the WebSocket, health, readiness and metrics."""
    server = config.server
    ws_factory = ConsoleWebSocketFactory(
        sessions=sessions,
        scheme="https" if server.tls else "http",
        allowed_origins=server.allowed_origins,
        trusted_proxies=server.trusted_proxies,
        open_handshake_timeout=config.session.websocket_handshake_timeout,
        max_message_size=config.session.max_message_size,
        server_name="cpvm",
        reactor=reactor,
    )
    page = (
        MetricsPage(
            metrics.exposition_registry(), config.metrics.allow, before=sessions.count_relayed
        )
        if config.metrics.enabled
        else None
    )
    root = build_root(
        novnc_dir=server.novnc_dir,
        websocket_factory=ws_factory,
        readiness=_readiness(sessions, heartbeat, manager),
        metrics=page,
    )
    root.putChild(
        PLAYER_PATH.encode("ascii"),
        build_player(directory=str(config.recording.directory), redeem=manager.redeem_playback),
    )
    # cpvm takes no request bodies; an HTTP connection that has not sent its whole request
    # (or WebSocket upgrade) within the handshake timeout of its accept is dropped, and
    # connections still in that phase are capped: slow-loris clients cannot pile up.
    limits = HttpLimits(
        max_body=0,
        request_deadline=config.session.websocket_handshake_timeout,
        max_connections=server.max_http_connections,
        max_connections_per_address=server.max_http_connections_per_address,
        per_address_exempt=server.trusted_proxies,
    )
    return ConsoleSite(
        root,
        limits=limits,
        reactor=reactor,
        timeout=config.session.websocket_handshake_timeout,
        security_headers=SecurityHeaders(tls=server.tls, frame_ancestors=server.frame_ancestors),
    )


def _readiness(sessions: SessionRegistry, heartbeat: Heartbeat, manager: ManagerClient):
    """``/ready``'s answer: (ready, why) from the registry and the heartbeat."""

    def readiness() -> tuple[bool, str]:
        if not sessions.accepting:
            return False, "shutting down"
        if heartbeat.conflict:
            return False, (
                f"proxy key {manager.key_id} is in use by another running cpvm "
                "instance (instance_conflict)"
            )
        if not heartbeat.manager_reachable:
            return False, "manager not reachable"
        return True, f"{len(sessions)} session(s)"

    return readiness


def _listening_endpoint(
    config: CpvmConfig, reactor, worker: int | None
) -> tuple[IStreamServerEndpoint, ReloadableServerTLS | None]:
    """Where cpvm listens: TCP or TLS, shared with SO_REUSEPORT when there are workers."""
    server = config.server
    tls = None
    if server.tls:
        # parse_config guarantees both paths when tls = true.
        assert server.certificate is not None and server.private_key is not None
        try:
            tls = ReloadableServerTLS(server.certificate, server.private_key, server.chain)
        except TLSFilesError as e:
            raise ConfigError(config.path, "server", "private_key", str(e)) from None
    endpoint: IStreamServerEndpoint
    if server.workers > 1 or worker is not None:
        endpoint = ReusePortEndpoint(reactor, server.port, server.bind, tls)
    elif tls is not None:
        endpoint = endpoints.SSL4ServerEndpoint(reactor, server.port, tls, interface=server.bind)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, server.port, interface=server.bind)
    return endpoint, tls


def makeService(options: Options):  # noqa: N802 (twistd's name)
    from twisted.internet import reactor

    config = options["parsed"]
    logs.configure(
        format=config.log.format,
        level=config.log.level,
        name="cpvm",
        audit_file=config.log.audit_file,
        worker=options["worker"],
        workers=config.server.workers,
    )
    try:
        svc = build_service(config, reactor, worker=options["worker"])
    except ConfigError as e:
        raise SystemExit(f"cpvm: {e}") from None
    _install_signal_handlers(reactor, svc)
    return svc


def _install_signal_handlers(reactor, svc: ProxyService) -> None:
    import signal

    def on_hup(signum, frame):
        reactor.callFromThread(svc.reload_tls)

    signal.signal(signal.SIGHUP, on_hup)
