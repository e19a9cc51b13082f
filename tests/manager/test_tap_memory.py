"""The manager's wiring (``cpvm.manager.tap``) against a memory reactor: what listens
where (TCP or TLS), the services and the resource tree, the cleanup timer on the injected
clock, start-up refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from cpvm.common.inifile import ConfigError
from cpvm.common.metrics import MetricsPage
from cpvm.manager import tap
from cpvm.manager.config import load_config
from cpvm.manager.proxy_api import ProxyApiResource
from cpvm.manager.public_api import PublicApiResource
from cpvm.manager.site import HealthResource, ReadyResource


def conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manager.conf"
    path.write_text(f"[server]\ndata_dir = {tmp_path}/data\n" + text)
    return path


def test_services_timer_and_tree(tmp_path):
    config = load_config(
        str(
            conf(
                tmp_path,
                "listen = tcp:18250:interface=127.0.0.3\n[sessions]\ncleanup_interval = 45\n",
            )
        )
    )
    reactor, clock = MemoryReactorClock(), Clock()
    svc = tap.build_manager(config, reactor, clock=clock)
    database, http, timer = list(svc)
    assert isinstance(database, tap.DatabaseService) and database.database is svc.database
    assert isinstance(http, StreamServerEndpointService) and http is svc.http
    assert isinstance(timer, TimerService)
    # The cleanup runs on the clock the logic uses, at the configured interval.
    assert (timer.clock, timer.step) == (clock, 45)
    svc.startService()
    try:
        [(port, site, backlog, interface)] = reactor.tcpServers
        assert (port, interface) == (18250, "127.0.0.3")
        root = site.resource
        assert isinstance(root.children[b"client"].children[b"api"], PublicApiResource)
        assert isinstance(root.children[b"proxy"], ProxyApiResource)
        assert isinstance(root.children[b"healthz"], HealthResource)
        assert isinstance(root.children[b"readyz"], ReadyResource)
        assert isinstance(root.children[b"metrics"], MetricsPage)  # on by default
        assert reactor.sslServers == []
    finally:
        svc.stopService()


def test_tls_listener_serves_the_configured_certificate(tmp_path, pki):
    listen = f"ssl:18251:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
    config = load_config(str(conf(tmp_path, f"listen = {listen}\n[metrics]\nenabled = false\n")))
    reactor = MemoryReactorClock()
    svc = tap.build_manager(config, reactor)
    svc.startService()
    try:
        assert reactor.tcpServers == []
        [(port, site, context, backlog, interface)] = reactor.sslServers
        assert (port, interface) == (18251, "127.0.0.1")
        served = SSL.Connection(context.getContext(), None).get_certificate()
        assert served.to_cryptography().serial_number == _serial(pki.server_cert)
        assert b"metrics" not in site.resource.children
    finally:
        svc.stopService()


def _serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_an_unusable_secret_key_stops_start_up(tmp_path):
    key = tmp_path / "bad.key"
    key.write_text("not a key\n")
    config = load_config(str(conf(tmp_path, f"[security]\nsecret_key_file = {key}\n")))
    with pytest.raises(ConfigError) as e:
        tap.build_manager(config, MemoryReactorClock())
    assert "[security] secret_key_file" in str(e.value)


def test_a_database_that_cannot_be_migrated_stops_start_up(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manager.db").write_text("not a database, but a text file")
    options = tap.Options()
    options.parseOptions(["--config", str(conf(tmp_path, ""))])
    reactor = MemoryReactorClock()
    with pytest.raises(SystemExit) as e:
        tap.makeService(options, reactor=reactor)
    assert "[database] url" in str(e.value) and "cannot open or migrate" in str(e.value)
    assert reactor.tcpServers == []  # nothing listened
