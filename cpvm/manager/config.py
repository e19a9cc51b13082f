"""The manager's configuration, parsed once into frozen dataclasses.

Every setting is documented in ``etc/cpvm/manager.conf``. ``load_config`` reads the
INI file with :class:`cpvm.common.inifile.IniReader`, refuses unknown keys and returns a
:class:`ManagerConfig`; a bad file raises :class:`cpvm.common.inifile.ConfigError` naming the
file, the ``[section] key`` and the reason.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cpvm.common.addresses import parse_networks
from cpvm.common.contract import VIEWER_POLICIES, ViewerPolicy
from cpvm.common.inifile import ConfigError, IniReader
from cpvm.common.sections import LogConfig, MetricsConfig, read_log, read_metrics
from cpvm.manager.inventory_config import LibvirtSourceConfig, read_inventory

DEFAULT_CONFIG_PATH = "/etc/cpvm/manager.conf"
DEFAULT_DATA_DIR = "/var/lib/cpvm-manager"
# Loopback only: the API is plain HTTP unless an ssl: endpoint is configured.
DEFAULT_LISTEN = "tcp:8250:interface=127.0.0.1"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerConfig:
    """Where the HTTP API listens and whom it trusts for ``X-Forwarded-For``."""

    listen: str
    trusted_proxies: tuple[IPNetwork, ...]
    # Largest request body accepted, in bytes (413 beyond, before it is read).
    max_body_size: int
    # Seconds for a whole request to arrive, from accept (or the previous answer).
    request_timeout: float


@dataclass(frozen=True)
class DatabaseConfig:
    """``kind`` is ``sqlite`` (``path`` set) or ``postgresql`` (``dsn`` set)."""

    kind: str
    path: str | None
    dsn: str | None
    pool_size: int


@dataclass(frozen=True)
class SecurityConfig:
    """The key-encryption key file protecting API secrets and VNC passwords at rest, how
    strictly API signatures must carry an expiry, and the createConsoleEndpoint rate."""

    secret_key_file: Path
    signature_expiry_required: bool = True
    max_request_lifetime: float = 600.0
    create_rate: float = 10.0
    create_burst: int = 50


@dataclass(frozen=True)
class TokenConfig:
    """One-time console token settings."""

    ttl: float
    bind_client_address: bool
    # Seconds after an unclean end during which the same browser may resume the session
    # with its used token (cpvm/manager/resume.py); 0: never.
    reconnect_window: float = 30.0


@dataclass(frozen=True)
class ProxyConfig:
    """How console proxies (cpvm) are chosen and addressed."""

    proxy_timeout: float
    heartbeat_interval: int
    url_domain: str | None


@dataclass(frozen=True)
class SessionConfig:
    """Session limits handed to cpvm and record keeping."""

    idle_timeout: int | None
    max_duration: int | None
    retention_days: float
    cleanup_interval: float
    # Who may hold a VM's console at once, for VMs without their own policy.
    viewer_policy: ViewerPolicy = ViewerPolicy.SHARED


@dataclass(frozen=True)
class RecordingPolicyConfig:
    """``[recording]``: whether sessions are recorded when neither the VM nor the account
    says (docs/recording.md), and who may play a recording back."""

    default: str = "never"  # "never" or "always"
    # An account may play back recordings of its own sessions (admins always may).
    account_playback: bool = False
    # How long a playback URL stays valid (it works once).
    playback_ttl: float = 300.0


@dataclass(frozen=True)
class ManagerConfig:
    """Everything the manager needs, as read from one file."""

    source: str
    data_dir: Path
    server: ServerConfig
    database: DatabaseConfig
    security: SecurityConfig
    tokens: TokenConfig
    proxies: ProxyConfig
    sessions: SessionConfig
    metrics: MetricsConfig
    log: LogConfig
    inventory: tuple[LibvirtSourceConfig, ...] = ()  # [inventory.libvirt.NAME] sections
    recording: RecordingPolicyConfig = RecordingPolicyConfig()


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    return parse_networks((p for p in raw.replace(",", " ").split() if p), allow_any=False)


def _optional_int(reader: IniReader, section: str, key: str, minimum: int) -> int | None:
    value = reader.get(section, key, None, int, "an integer or nothing")
    if value is not None and value < minimum:
        raise reader.error(section, key, f"must be at least {minimum}, got {value}")
    return value


def _database(reader: IniReader, data_dir: Path) -> DatabaseConfig:
    url = reader.optional_string("database", "url")
    pool_size = reader.integer("database", "pool_size", 10, minimum=1, maximum=200)
    if url is None:
        return DatabaseConfig("sqlite", str(data_dir / "manager.db"), None, 1)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise reader.error("database", "url", "sqlite URL without a path")
        return DatabaseConfig("sqlite", path, None, 1)
    if url.startswith(("postgresql://", "postgres://")):
        return DatabaseConfig("postgresql", None, url, pool_size)
    raise reader.error(
        "database", "url", "expected sqlite:///PATH or postgresql://…, got another scheme"
    )


def _security(reader: IniReader, data_dir: Path) -> SecurityConfig:
    key_file = reader.path("security", "secret_key_file", str(data_dir / "secret.key"))
    assert key_file is not None
    expiry = reader.choice("security", "signature_expiry", "required", ("required", "optional"))
    return SecurityConfig(
        secret_key_file=key_file,
        signature_expiry_required=expiry == "required",
        max_request_lifetime=reader.number(
            "security", "max_request_lifetime", 600.0, minimum=1.0, maximum=86400.0
        ),
        create_rate=reader.number("security", "create_rate", 10.0, minimum=0.0, maximum=1e6),
        create_burst=reader.integer("security", "create_burst", 50, minimum=1, maximum=10**6),
    )


def _recording(reader: IniReader) -> RecordingPolicyConfig:
    return RecordingPolicyConfig(
        default=reader.choice("recording", "default", "never", ("never", "always")),
        account_playback=reader.boolean("recording", "account_playback", False),
        playback_ttl=reader.number("recording", "playback_ttl", 300.0, minimum=5.0, maximum=86400),
    )


# [tokens] reconnect_window (cpvm/manager/resume.py). noVNC 1.3 retries once,
# reconnect_delay (5 s by default) after a drop: a shorter window would never see its retry.
RECONNECT_WINDOW = 30.0
MIN_RECONNECT_WINDOW = 5.0
MAX_RECONNECT_WINDOW = 3600.0


def _reconnect_window(reader: IniReader) -> float:
    window = reader.number("tokens", "reconnect_window", RECONNECT_WINDOW, minimum=0.0)
    if window and not MIN_RECONNECT_WINDOW <= window <= MAX_RECONNECT_WINDOW:
        raise reader.error(
            "tokens",
            "reconnect_window",
            f"must be 0 (off) or from {MIN_RECONNECT_WINDOW:g} to {MAX_RECONNECT_WINDOW:g} "
            f"seconds, got {window:g}",
        )
    return window


def _tokens(reader: IniReader) -> TokenConfig:
    return TokenConfig(
        ttl=reader.number("tokens", "ttl", 60.0, minimum=5.0, maximum=3600.0),
        bind_client_address=reader.boolean("tokens", "bind_client_address", False),
        reconnect_window=_reconnect_window(reader),
    )


def parse_config(reader: IniReader) -> ManagerConfig:
    """Read every setting from ``reader`` and refuse unknown ones."""
    data_dir = reader.path("server", "data_dir", DEFAULT_DATA_DIR)
    assert data_dir is not None
    listen = reader.string("server", "listen", DEFAULT_LISTEN)
    if not listen.startswith(("tcp:", "ssl:", "unix:")):
        raise reader.error("server", "listen", f"expected a tcp:/ssl: endpoint, got {listen!r}")
    trusted: tuple[IPNetwork, ...] = reader.get(
        "server", "trusted_proxies", (), _networks, "a list of CIDRs"
    )
    server = ServerConfig(
        listen=listen,
        trusted_proxies=trusted,
        max_body_size=reader.integer(
            "server", "max_body_size", 1024 * 1024, minimum=1024, maximum=64 * 1024 * 1024
        ),
        request_timeout=reader.number("server", "request_timeout", 60.0, minimum=1.0),
    )
    database = _database(reader, data_dir)
    security = _security(reader, data_dir)
    tokens = _tokens(reader)
    url_domain = reader.optional_string("proxies", "url_domain")
    if url_domain is not None and ("/" in url_domain or ":" in url_domain):
        raise reader.error("proxies", "url_domain", "expected a host name or *.domain pattern")
    proxies = ProxyConfig(
        proxy_timeout=reader.number("proxies", "proxy_timeout", 20.0, minimum=1.0),
        heartbeat_interval=reader.integer("proxies", "heartbeat_interval", 5, minimum=1),
        url_domain=url_domain,
    )
    sessions = SessionConfig(
        idle_timeout=_optional_int(reader, "sessions", "idle_timeout", 1),
        max_duration=_optional_int(reader, "sessions", "max_duration", 1),
        retention_days=reader.number("sessions", "retention_days", 30.0, minimum=0.0),
        cleanup_interval=reader.number("sessions", "cleanup_interval", 30.0, minimum=0.1),
        viewer_policy=ViewerPolicy(
            reader.choice("sessions", "viewer_policy", "shared", VIEWER_POLICIES)
        ),
    )
    metrics, log, recording = read_metrics(reader), read_log(reader), _recording(reader)
    inventory = read_inventory(reader)
    reader.check_unknown()
    if proxies.heartbeat_interval >= proxies.proxy_timeout:
        raise reader.error("proxies", "proxy_timeout", "must be larger than heartbeat_interval")
    return ManagerConfig(
        source=reader.filename,
        data_dir=data_dir,
        server=server,
        database=database,
        security=security,
        tokens=tokens,
        proxies=proxies,
        sessions=sessions,
        metrics=metrics,
        log=log,
        inventory=inventory,
        recording=recording,
    )


def load_config(path: str | None) -> ManagerConfig:
    """Load ``path``; ``None`` means the default file, or embedded defaults if it is absent."""
    if path is None:
        if os.path.exists(DEFAULT_CONFIG_PATH):
            return parse_config(IniReader(DEFAULT_CONFIG_PATH))
        return parse_config(IniReader.empty())
    return parse_config(IniReader(path))


__all__ = ["ConfigError", "ManagerConfig", "load_config", "parse_config"]
