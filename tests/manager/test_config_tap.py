"""Configuration parsing and the twistd wiring."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock as MemoryReactor

from cpvm.common.inifile import ConfigError, IniReader
from cpvm.manager import tap
from cpvm.manager.config import load_config, parse_config

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "cpvm" / "manager.conf"


def test_defaults():
    c = parse_config(IniReader.empty())
    assert c.server.listen == "tcp:8250:interface=127.0.0.1"  # loopback by default
    assert c.security.signature_expiry_required is True
    assert c.security.max_request_lifetime == 600
    assert (c.security.create_rate, c.security.create_burst) == (10, 50)
    assert c.server.max_body_size == 1024 * 1024 and c.server.request_timeout == 60
    assert c.database.kind == "sqlite"
    assert c.database.path == "/var/lib/cpvm-manager/manager.db"
    assert str(c.security.secret_key_file) == "/var/lib/cpvm-manager/secret.key"
    assert c.tokens.ttl == 60 and c.tokens.bind_client_address is False
    assert c.tokens.reconnect_window == 30
    assert c.proxies.proxy_timeout == 20 and c.proxies.heartbeat_interval == 5
    assert c.sessions.retention_days == 30 and c.sessions.idle_timeout is None


def test_shipped_file_parses_to_defaults():
    assert parse_config(IniReader(str(SHIPPED))) == parse_config(IniReader.empty(str(SHIPPED)))


def test_values_and_errors():
    c = parse_config(
        IniReader(
            "m.conf",
            text=(
                "[server]\ntrusted_proxies = 10.0.0.0/8, 127.0.0.1\n"
                "[database]\nurl = postgresql://u@db/cpvm\npool_size = 4\n"
                "[proxies]\nurl_domain = *.example.com\n"
            ),
        )
    )
    assert c.server.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert (c.database.kind, c.database.dsn, c.database.pool_size) == (
        "postgresql",
        "postgresql://u@db/cpvm",
        4,
    )
    c = parse_config(
        IniReader(
            "m.conf",
            text=(
                "[security]\nsignature_expiry = optional\nmax_request_lifetime = 60\n"
                "create_rate = 0\ncreate_burst = 5\n"
            ),
        )
    )
    assert c.security.signature_expiry_required is False
    assert c.security.max_request_lifetime == 60
    assert (c.security.create_rate, c.security.create_burst) == (0, 5)
    for text, where in [
        ("[tokens]\nttl = soon\n", "[tokens] ttl"),
        ("[tokens]\ntll = 5\n", "[tokens] tll"),
        ("[tokens]\nreconnect_window = 2\n", "[tokens] reconnect_window"),
        ("[tokens]\nreconnect_window = 3601\n", "[tokens] reconnect_window"),
        ("[tokens]\nreconnect_window = -1\n", "[tokens] reconnect_window"),
        ("[tokens]\nreconnect_window = nan\n", "[tokens] reconnect_window"),
        ("[database]\nurl = mysql://x\n", "[database] url"),
        ("[server]\ntrusted_proxies = 10.0.0.0/33\n", "[server] trusted_proxies"),
        ("[proxies]\nproxy_timeout = 3\n", "[proxies] proxy_timeout"),
        ("[security]\nsignature_expiry = sometimes\n", "[security] signature_expiry"),
        ("[security]\nmax_request_lifetime = 0\n", "[security] max_request_lifetime"),
        ("[security]\ncreate_rate = -1\n", "[security] create_rate"),
        ("[security]\ncreate_burst = 0\n", "[security] create_burst"),
        ("[server]\nmax_body_size = 100\n", "[server] max_body_size"),
        ("[server]\nrequest_timeout = never\n", "[server] request_timeout"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(IniReader("m.conf", text=text))
        assert str(e.value).startswith(f"m.conf: {where}: "), str(e.value)


def test_reconnect_window_off_or_in_range():
    for text, window in [("0", 0.0), ("5", 5.0), ("12.5", 12.5), ("3600", 3600.0)]:
        c = parse_config(IniReader("m.conf", text=f"[tokens]\nreconnect_window = {text}\n"))
        assert c.tokens.reconnect_window == window


def test_missing_explicit_file_fails(tmp_path):
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "nope.conf"))


def test_make_service_listens_on_loopback_by_default(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text(f"[server]\ndata_dir = {tmp_path}/data\n")
    options = tap.Options()
    options.parseOptions(["--config", str(conf)])
    reactor = MemoryReactor()
    svc = tap.makeService(options, reactor=reactor)
    names = {type(s).__name__ for s in svc}
    assert {"DatabaseService", "StreamServerEndpointService", "TimerService"} <= names
    svc.startService()
    try:
        assert [(p, i) for p, _f, _b, i in reactor.tcpServers] == [(8250, "127.0.0.1")]
    finally:
        svc.stopService()
    key = tmp_path / "data" / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "data" / "manager.db").exists()


def test_make_service_bad_config_exits(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("[tokens]\nttl = -1\n")
    options = tap.Options()
    options.parseOptions(["--config", str(conf)])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options, reactor=MemoryReactor())
    assert "[tokens] ttl" in str(e.value)
