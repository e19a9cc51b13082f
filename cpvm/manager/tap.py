"""``twistd cpvm-manager``: the one place where the manager's services are built."""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python import usage

from cpvm import __version__
from cpvm.common import logs
from cpvm.common.httplimits import HttpLimits
from cpvm.common.inifile import ConfigError
from cpvm.common.ratelimit import KeyedRateLimiter
from cpvm.common.tls import server_endpoint
from cpvm.manager import db as dbmodule
from cpvm.manager import store, vm_api
from cpvm.manager.auth import ApiAuthenticator
from cpvm.manager.config import (
    DEFAULT_CONFIG_PATH,
    IPNetwork,
    ManagerConfig,
    RecordingPolicyConfig,
    load_config,
)
from cpvm.manager.consoles import BrokerSettings, ConsoleBroker
from cpvm.manager.inventory import InventoryService, load_libvirt
from cpvm.manager.inventory_config import PREFIX
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.recording_api import PlaybackBroker
from cpvm.manager.secrets_box import SecretBox, SecretKeyError
from cpvm.manager.signing import ExpiryPolicy
from cpvm.manager.site import DEFAULT_LIMITS, ManagerSite, build_site

_log = Logger()


class Options(usage.Options):
    """Command line of ``twistd cpvm-manager``."""

    optParameters = [
        [
            "config",
            "c",
            None,
            f"configuration file (default {DEFAULT_CONFIG_PATH}; embedded defaults if absent)",
        ],
    ]


class DatabaseService(service.Service):
    """Owns the connection pool: closes it when the application stops."""

    def __init__(self, database: dbmodule.Database):
        self.database = database

    def stopService(self):
        super().stopService()
        self.database.close()
        if self.database.kind == "sqlite" and not self.database.mark_clean_stop():
            _log.warn(
                "could not record a clean stop: pending console tokens will be voided "
                "at the next start"
            )


class ManagerService(service.MultiService):
    """The manager: HTTP listener, database pool and cleanup timer."""

    def __init__(
        self,
        config: ManagerConfig,
        broker: ConsoleBroker,
        http: Any,
        metrics: ManagerMetrics,
        database: dbmodule.Database,
    ):
        super().__init__()
        self.config = config
        self.broker = broker
        self.http = http
        self.metrics = metrics
        self.database = database

    def startService(self):
        _log.info(
            "cpvm-manager {version} starting, config {source}, listening on {listen}, "
            "database {kind}",
            version=__version__,
            source=self.config.source,
            listen=self.config.server.listen,
            kind=self.config.database.kind,
        )
        super().startService()


def build_manager(config: ManagerConfig, reactor: Any, clock: Any = None) -> ManagerService:
    """Build every service of the manager. ``clock`` (default: the reactor) drives the logic.

    Migrations run synchronously here, before anything listens: a database that can't be
    brought up to date stops start-up with a clear error.
    """
    clock = clock if clock is not None else reactor
    try:
        box = SecretBox.from_file(config.security.secret_key_file)
    except SecretKeyError as e:
        raise ConfigError(config.source, "security", "secret_key_file", str(e)) from None
    prepare_database(config, clock)
    database = dbmodule.Database(config.database, reactor)
    metrics = ManagerMetrics()
    broker = ConsoleBroker(database, box, clock, broker_settings(config), metrics)
    security = config.security
    site = manager_site(
        broker,
        database,
        box,
        clock,
        reactor,
        metrics,
        trusted_proxies=config.server.trusted_proxies,
        metrics_allow=config.metrics.allow if config.metrics.enabled else None,
        expiry=ExpiryPolicy(
            required=security.signature_expiry_required,
            max_lifetime=security.max_request_lifetime,
        ),
        create_limiter=KeyedRateLimiter(security.create_rate, security.create_burst, clock),
        # Bodies are capped and each request must arrive in time, before twisted.web reads it.
        limits=HttpLimits(
            max_body=config.server.max_body_size, request_deadline=config.server.request_timeout
        ),
        recording=config.recording,
    )
    # As strports.service, with cpvm's TLS policy on an ssl: listener (cpvm/common/tls.py).
    http = StreamServerEndpointService(server_endpoint(reactor, config.server.listen), site)
    http._raiseSynchronously = True
    top = ManagerService(config, broker, http, metrics, database)
    DatabaseService(database).setServiceParent(top)
    if config.inventory:
        # After the database service: stopped before its pool closes.
        inventory_service(config, database, box, reactor, clock).setServiceParent(top)
    http.setServiceParent(top)
    cleanup_timer(broker, config.sessions.cleanup_interval, clock).setServiceParent(top)
    return top


def prepare_database(config: ManagerConfig, clock: Any) -> None:
    """Migrate the database and, for SQLite, void what a power cut may have left unsafe;
    a failure is a :class:`ConfigError` on ``[database] url``."""
    try:
        dbmodule.migrate(config.database, clock.seconds())
    except Exception as e:
        raise ConfigError(
            config.source, "database", "url", f"cannot open or migrate the database: {e}"
        ) from None
    if config.database.kind != "sqlite":
        return
    try:
        voided = dbmodule.recover_sqlite(config.database, clock.seconds())
    except Exception as e:
        raise ConfigError(
            config.source, "database", "url", f"cannot recover the database: {e}"
        ) from None
    if voided:
        _log.warn(
            "the previous run did not stop cleanly: {voided} pending console "
            "token(s) voided (their redemption may not have reached the disk)",
            voided=voided,
        )


def broker_settings(config: ManagerConfig) -> BrokerSettings:
    """The broker's settings, from the configuration."""
    return BrokerSettings(
        token_ttl=config.tokens.ttl,
        bind_client_address=config.tokens.bind_client_address,
        proxy_timeout=config.proxies.proxy_timeout,
        heartbeat_interval=config.proxies.heartbeat_interval,
        url_domain=config.proxies.url_domain,
        idle_timeout=config.sessions.idle_timeout,
        max_duration=config.sessions.max_duration,
        retention_seconds=config.sessions.retention_days * 86400.0,
        reconnect_window=config.tokens.reconnect_window,
        viewer_policy=config.sessions.viewer_policy,
        record_default=config.recording.default,
    )


def manager_site(
    broker: ConsoleBroker,
    database: dbmodule.Database,
    box: SecretBox,
    clock: Any,
    reactor: Any,
    metrics: ManagerMetrics,
    *,
    trusted_proxies: tuple[IPNetwork, ...] = (),
    metrics_allow: tuple[IPNetwork, ...] | None = None,
    expiry: ExpiryPolicy = ExpiryPolicy(),
    create_limiter: KeyedRateLimiter | None = None,
    limits: HttpLimits = DEFAULT_LIMITS,
    recording: RecordingPolicyConfig = RecordingPolicyConfig(),
) -> ManagerSite:
    """The resource tree over ``database``: what touches the database (the API key check,
    the VM commands, the readiness ping) is built here, so no resource reaches the store."""
    return build_site(
        broker,
        ApiAuthenticator(database, box, clock, expiry),
        lambda: database.ping(),  # looked up per check: a test may swap the pool's ping
        clock,
        trusted_proxies,
        metrics,
        metrics_allow,
        reactor,
        vm_commands=vm_api.commands(database, box, clock),
        create_limiter=create_limiter,
        limits=limits,
        spend_signature=lambda signature, expires: database.run(
            store.spend_signature, signature, expires
        ),
        playback=PlaybackBroker(database, clock, recording, broker.settings.url_domain),
    )


def cleanup_timer(broker: ConsoleBroker, interval: float, clock: Any) -> TimerService:
    """The periodic :meth:`ConsoleBroker.cleanup`, on the logic's clock."""

    def cleanup() -> Deferred:
        d = ensureDeferred(broker.cleanup())
        d.addErrback(lambda f: _log.failure("cleanup failed", f))
        return d

    timer = TimerService(interval, cleanup)
    timer.clock = clock
    return timer


def inventory_service(
    config: ManagerConfig, database: dbmodule.Database, box: SecretBox, reactor: Any, clock: Any
) -> InventoryService:
    """libvirt discovery for the [inventory.libvirt.NAME] sections."""
    try:
        libvirt = load_libvirt()
    except ImportError:
        raise ConfigError(
            config.source,
            PREFIX + config.inventory[0].name,
            None,
            "the libvirt Python binding is not installed (Debian: "
            "python3-libvirt; PyPI: libvirt-python)",
        ) from None
    return InventoryService(config.inventory, database, box, reactor, clock, libvirt)


def makeService(options: Options, reactor: Any = None) -> ManagerService:
    """twistd entry point."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = load_config(options["config"])
        logs.configure(
            format=config.log.format,
            level=config.log.level,
            name="cpvm-manager",
            audit_file=config.log.audit_file,
        )
        return build_manager(config, reactor)
    except ConfigError as e:
        raise SystemExit(f"cpvm-manager: configuration error: {e}") from None
