"""cpvm's configuration: one INI file parsed once into frozen, typed objects.

Every setting, its default and its meaning is documented in ``etc/cpvm/cpvm.conf``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cpvm.common.addresses import Network
from cpvm.common.inifile import ConfigError, IniReader
from cpvm.common.sections import LogConfig, MetricsConfig, networks, read_log, read_metrics
from cpvm.proxy.headers import check_frame_ancestors

DEFAULT_CONFIG_PATH = "/etc/cpvm/cpvm.conf"
# The proxy's own TLS directory (the package makes it root:cpvm 0750; docs/operations.md).
TLS_DIR = "/etc/cpvm/proxy-tls"
# The 0.1.0 package's directory, shared with the manager's key: upgrades leave it alone.
LEGACY_TLS_DIR = "/etc/cpvm/tls"


@dataclass(frozen=True)
class ServerConfig:
    """Where cpvm listens and how browsers reach it."""

    tls: bool
    bind: str
    port: int
    certificate: Path | None
    private_key: Path | None
    chain: Path | None
    public_host: str
    public_port: int
    public_address: str
    # "self" stands for the page's own origin (scheme://Host of the request).
    allowed_origins: tuple[str, ...]
    # CSP frame-ancestors sources: who may embed cpvm's pages ('self' by default).
    frame_ancestors: str
    trusted_proxies: tuple[Network, ...]
    workers: int
    grace_period: float
    novnc_dir: Path
    # Where the instance id lives (cpvm/proxy/instance.py): the unit's StateDirectory=.
    state_directory: Path
    # Connections that have not finished their HTTP phase (request or WebSocket upgrade),
    # in total and per TCP peer address (0: no cap).
    max_http_connections: int
    max_http_connections_per_address: int

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


@dataclass(frozen=True)
class ManagerConfig:
    """How cpvm reaches the management endpoint."""

    url: str
    credential: str | None
    ca_file: Path | None
    timeout: float
    heartbeat_interval: float
    allow_plaintext: bool


@dataclass(frozen=True)
class VncConfig:
    """How cpvm talks to VNC servers upstream."""

    connect_timeout: float
    handshake_timeout: float
    ca_file: Path | None
    allow_anonymous_tls: bool


@dataclass(frozen=True)
class SessionConfig:
    """Limits applied to each console session."""

    websocket_handshake_timeout: float
    idle_timeout: float
    max_duration: float
    max_sessions: int
    max_message_size: int
    shared: bool
    # Sessions whose token the manager has not answered yet (part of max_sessions).
    max_pending: int
    # Failed redemptions per client address: a bucket of this many, refilled per second.
    failed_redemption_burst: int
    failed_redemption_rate: float


@dataclass(frozen=True)
class RecordingConfig:
    """``[recording]``: where and how this proxy keeps the sessions the manager says to
    record (docs/recording.md). Whether a session is recorded is the manager's policy."""

    # One file per session, mode 0600; by default in the unit's StateDirectory=.
    directory: Path
    # A file that cannot keep up (disk full, too slow): end the session, or go on and
    # mark the recording incomplete.
    on_failure: str
    # Also keep the browser's input (keys, pointer, clipboard) in a side file.
    record_input: bool
    # Delete recordings older than this many days (0: never by age).
    retention_days: float
    # Keep the directory under this many bytes, oldest first (0: no bound).
    max_bytes: int
    # Bytes a file may have waiting for the disk before it counts as failed.
    max_buffer: int


@dataclass(frozen=True)
class CpvmConfig:
    """Everything cpvm needs, as read from one file."""

    path: str
    server: ServerConfig
    manager: ManagerConfig
    vnc: VncConfig
    session: SessionConfig
    log: LogConfig
    metrics: MetricsConfig
    recording: RecordingConfig


def load_config(path: str | None) -> CpvmConfig:
    """Read ``path`` (or the embedded defaults when ``None``)."""
    reader = IniReader(path) if path is not None else IniReader.empty()
    return parse_config(reader)


def parse_config(r: IniReader) -> CpvmConfig:
    """Every section of ``cpvm.conf``; unknown keys and bad values raise ``ConfigError``."""
    server = _read_server(r)
    manager = _read_manager(r)
    vnc = VncConfig(
        connect_timeout=r.number("vnc", "connect_timeout", 10.0, minimum=0.1),
        handshake_timeout=r.number("vnc", "handshake_timeout", 15.0, minimum=0.1),
        ca_file=r.path("vnc", "ca_file", None, must_exist=True),
        allow_anonymous_tls=r.boolean("vnc", "allow_anonymous_tls", False),
    )
    session = _read_session(r)
    recording = _read_recording(r, server.state_directory)
    log = read_log(r)
    metrics = read_metrics(r)
    if server.workers > 1 and server.port == 0:
        raise r.error("server", "workers", "several workers need a fixed port (port = 0)")
    r.check_unknown()
    return CpvmConfig(
        path=r.filename,
        server=server,
        manager=manager,
        vnc=vnc,
        session=session,
        log=log,
        metrics=metrics,
        recording=recording,
    )


def _read_recording(r: IniReader, state_directory: Path) -> RecordingConfig:
    return RecordingConfig(
        directory=r.path(  # type: ignore[arg-type]
            "recording", "directory", str(state_directory / "recordings")
        ),
        on_failure=r.choice("recording", "on_failure", "end", ("end", "continue")),
        record_input=r.boolean("recording", "record_input", False),
        retention_days=r.number("recording", "retention_days", 30.0, minimum=0),
        max_bytes=r.integer("recording", "max_bytes", 0, minimum=0),
        max_buffer=r.integer(
            "recording", "max_buffer", 8 * 1024 * 1024, minimum=64 * 1024, maximum=1 << 30
        ),
    )


def _read_server(r: IniReader) -> ServerConfig:
    tls = r.boolean("server", "tls", False)
    port = r.port("server", "port", 8443 if tls else 8080)
    tls_dir = default_tls_dir()
    certificate = r.path(
        "server", "certificate", f"{tls_dir}/cert.pem" if tls else None, must_exist=tls
    )
    private_key = r.path(
        "server", "private_key", f"{tls_dir}/key.pem" if tls else None, must_exist=tls
    )
    chain = r.path("server", "chain", None, must_exist=True)
    bind = r.string("server", "bind", "0.0.0.0")
    _check_address(r, "server", "bind", bind)
    public_host = r.string("server", "public_host", socket.getfqdn() or "localhost")
    public_address = r.string("server", "public_address", "")
    if public_address:
        _check_address(r, "server", "public_address", public_address)
    origins = r.string_list("server", "allowed_origins", ("self",))
    for origin in origins:
        if origin in ("self", "*"):
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise r.error(
                "server",
                "allowed_origins",
                f"{origin!r} is not an origin like https://console.example.com",
            )
    return ServerConfig(
        tls=tls,
        bind=bind,
        port=port,
        certificate=certificate,
        private_key=private_key,
        chain=chain,
        public_host=public_host,
        public_port=r.port("server", "public_port", port),
        public_address=public_address,
        allowed_origins=tuple(o.rstrip("/").lower() for o in origins),
        frame_ancestors=_frame_ancestors(r),
        trusted_proxies=networks(r, "server", "trusted_proxies"),
        workers=r.integer("server", "workers", 1, minimum=1, maximum=256),
        grace_period=r.number("server", "grace_period", 10.0, minimum=0),
        novnc_dir=r.path("server", "novnc_dir", "/usr/share/novnc"),  # type: ignore[arg-type]
        state_directory=r.path(  # type: ignore[arg-type]
            "server", "state_directory", "/var/lib/cpvm"
        ),
        max_http_connections=r.integer("server", "max_http_connections", 1000, minimum=0),
        max_http_connections_per_address=r.integer(
            "server", "max_http_connections_per_address", 64, minimum=0
        ),
    )


def _read_session(r: IniReader) -> SessionConfig:
    return SessionConfig(
        websocket_handshake_timeout=r.number(
            "session", "websocket_handshake_timeout", 10.0, minimum=0.1
        ),
        idle_timeout=r.number("session", "idle_timeout", 900.0, minimum=0),
        max_duration=r.number("session", "max_duration", 28800.0, minimum=0),
        max_sessions=r.integer("session", "max_sessions", 1000, minimum=1),
        # noVNC sends every message through its 10 KiB send queue (clipboard pastes
        # are split into 10 KiB messages): 64 KiB leaves room and bounds what one
        # browser can make cpvm hold before a message is complete.
        max_message_size=r.integer("session", "max_message_size", 64 * 1024, minimum=1024),
        shared=r.boolean("session", "shared", True),
        max_pending=r.integer("session", "max_pending", 200, minimum=1),
        failed_redemption_burst=r.integer("session", "failed_redemption_burst", 20, minimum=1),
        failed_redemption_rate=r.number("session", "failed_redemption_rate", 0.5, minimum=0.001),
    )


def default_tls_dir() -> str:
    """Where ``certificate``/``private_key`` default to: ``TLS_DIR``, or ``LEGACY_TLS_DIR``
    when only that holds a ``cert.pem``, so a 0.1.0 configuration relying on the default
    keeps working after the upgrade."""
    if not os.path.exists(f"{TLS_DIR}/cert.pem") and os.path.exists(f"{LEGACY_TLS_DIR}/cert.pem"):
        return LEGACY_TLS_DIR
    return TLS_DIR


def _read_manager(r: IniReader) -> ManagerConfig:
    """The ``[manager]`` section; plain HTTP only to loopback unless allowed."""
    url = r.string("manager", "url", "http://127.0.0.1:8250")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise r.error("manager", "url", f"expected an http:// or https:// URL, got {url!r}")
    credential = r.secret_file("manager", "credential_file", None)
    if credential is not None and any(c.isspace() for c in credential):
        raise r.error("manager", "credential_file", "the proxy key must be a single word")
    allow_plaintext = r.boolean("manager", "allow_plaintext", False)
    if parts.scheme == "http" and not allow_plaintext and not is_loopback_host(parts.hostname):
        # The proxy key goes to the manager and VNC passwords come back over this URL.
        raise r.error(
            "manager",
            "allow_plaintext",
            f"[manager] url {url!r} is plain HTTP to a host that is not loopback: "
            "use https:// (with ca_file), or set allow_plaintext = true to send "
            "the proxy key and receive VNC passwords unencrypted",
        )
    manager = ManagerConfig(
        url=url.rstrip("/"),
        credential=credential,
        ca_file=r.path("manager", "ca_file", None, must_exist=True),
        timeout=r.number("manager", "timeout", 5.0, minimum=0.1, maximum=300),
        heartbeat_interval=r.number("manager", "heartbeat_interval", 5.0, minimum=0.5),
        allow_plaintext=allow_plaintext,
    )
    return manager


def is_loopback_host(host: str | None) -> bool:
    """A URL host that stays on this machine: a loopback address, or ``localhost`` (which
    RFC 6761 reserves for loopback). Any other name could resolve anywhere."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _frame_ancestors(r: IniReader) -> str:
    try:
        return check_frame_ancestors(r.string_list("server", "frame_ancestors", ("'self'",)))
    except ValueError as e:
        raise r.error("server", "frame_ancestors", str(e)) from None


def _check_address(r: IniReader, section: str, key: str, value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise r.error(section, key, f"expected an IP address, got {value!r}") from None


__all__ = ["ConfigError", "CpvmConfig", "load_config", "parse_config"]
