"""cpvm's wiring (``cpvm.proxy.tap``) against a memory reactor: from a configuration file
to what listens where, with which TLS context, which services run, what the first
heartbeat does; and the command line of extra workers."""

from __future__ import annotations

from pathlib import Path

import pytest
from autobahn.twisted.resource import WebSocketResource
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport

from cpvm.common.metrics import MetricsPage
from cpvm.common.tls import ReloadableServerTLS
from cpvm.proxy.config import CpvmConfig, load_config
from cpvm.proxy.heartbeat import Heartbeat
from cpvm.proxy.recording.service import Recordings
from cpvm.proxy.tap import ProxyService, build_service, worker_argv
from cpvm.proxy.workers import ReusePortEndpoint, WorkerPool
from tests.stubhttp import MemoryHttp

PLAIN = """\
[server]
bind = 127.0.0.2
port = 18080
public_host = console.example.com
novnc_dir = {novnc}
state_directory = {state}
[manager]
url = http://127.0.0.1:18250
heartbeat_interval = 7
[recording]
directory = {state}/recordings
retention_days = 0
"""

TLS = PLAIN.replace(
    "port = 18080", "port = 18443\ntls = true\ncertificate = {cert}\nprivate_key = {key}"
)


def config(tmp_path: Path, text: str, **values: object) -> CpvmConfig:
    novnc = tmp_path / "novnc"
    novnc.mkdir(exist_ok=True)
    (novnc / "vnc.html").write_text("<title>noVNC</title>")
    path = tmp_path / "cpvm.conf"
    path.write_text(text.format(novnc=novnc, state=tmp_path / "state", **values))
    return load_config(str(path))


def children(svc: ProxyService) -> list:
    return list(svc)


def test_plain_config_listens_on_tcp_and_schedules_the_heartbeat(tmp_path):
    reactor = MemoryReactorClock()
    svc = build_service(config(tmp_path, PLAIN), reactor)
    kinds = [type(s) for s in children(svc)]
    assert kinds == [StreamServerEndpointService, Heartbeat, Recordings]
    assert svc.tls is None and svc.workers is None
    assert reactor.getDelayedCalls() == []  # nothing happens before start-up
    svc.startService()
    [(port, site, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (18080, "127.0.0.2")
    assert reactor.sslServers == []
    # The first beat is due at once, then the heartbeat goes to the configured manager.
    [call] = reactor.getDelayedCalls()
    assert (call.func, call.getTime()) == (svc.heartbeat.beat, 0)
    reactor.advance(0)
    assert [(h, p) for h, p, *_ in reactor.tcpClients] == [("127.0.0.1", 18250)]
    assert svc.heartbeat.interval == 7
    # An unclean end reaches the manager with the next reactor turn, not the interval.
    assert svc.sessions.ends.on_unclean == svc.heartbeat.soon
    stopped = []
    svc.stopService().addBoth(stopped.append)
    assert stopped == [None]


def test_the_tree_served_on_that_port(tmp_path):
    reactor = MemoryReactorClock()
    svc = build_service(config(tmp_path, PLAIN), reactor)
    svc.startService()
    site = reactor.tcpServers[0][1]
    root = site.resource
    assert isinstance(root.children[b"websockify"], WebSocketResource)
    http = MemoryHttp(root)

    def get(path: str) -> tuple[int, bytes]:
        answer = http.get("http://console.example.com" + path)
        return answer.code, answer.body

    assert get("/healthz") == (200, b"ok\n")
    # Ready only once the manager answered a heartbeat.
    assert get("/readyz") == (503, b"not ready: manager not reachable\n")
    svc.heartbeat.manager_reachable = True
    assert get("/readyz") == (200, b"ready: 0 session(s)\n")
    # noVNC from the configured directory (its files are served by a producer that
    # StubTreq does not pump: checked by the integration tests), no listings.
    assert root.children[b"resource"].children[b"noVNC"].path == str(tmp_path / "novnc")
    assert get("/resource/noVNC/")[0] == 404
    assert get("/anything")[0] == 404
    # On by default (formatted in a thread: not fetched here).
    assert isinstance(root.children[b"metrics"], MetricsPage)
    svc.sessions.shutdown()
    assert get("/readyz") == (503, b"not ready: shutting down\n")


def test_metrics_off_means_no_metrics_page(tmp_path):
    reactor = MemoryReactorClock()
    svc = build_service(config(tmp_path, PLAIN + "[metrics]\nenabled = false\n"), reactor)
    svc.startService()
    assert b"metrics" not in reactor.tcpServers[0][1].resource.children


def test_tls_config_listens_with_the_configured_certificate(tmp_path, pki):
    reactor = MemoryReactorClock()
    svc = build_service(config(tmp_path, TLS, cert=pki.server_cert, key=pki.server_key), reactor)
    assert isinstance(svc.tls, ReloadableServerTLS)
    svc.startService()
    assert reactor.tcpServers == []
    [(port, site, context, backlog, interface)] = reactor.sslServers
    assert (port, interface) == (18443, "127.0.0.2")
    assert context is svc.tls
    # The context serves the leaf from the configured file.
    connection = SSL.Connection(context.getContext(), None)
    served = connection.get_certificate().to_cryptography()
    assert served.public_bytes(Encoding.PEM) == pki.server_cert.read_bytes()
    svc.stopService()


def test_a_port_that_cannot_be_bound_stops_start_up(tmp_path):
    class TakenPorts(MemoryReactorClock):
        def listenTCP(self, port, factory, backlog=50, interface=""):  # noqa: N802
            raise CannotListenError(interface, port, OSError("address in use"))

    svc = build_service(config(tmp_path, PLAIN), TakenPorts())
    with pytest.raises(CannotListenError):
        svc.startService()


def test_a_worker_shares_the_port_and_starts_no_workers(tmp_path):
    cfg = config(tmp_path, PLAIN.replace("[manager]", "workers = 2\n[manager]"))
    reactor = MemoryReactorClock()
    svc = build_service(cfg, reactor, worker=1)
    assert svc.workers is None
    assert not any(isinstance(s, WorkerPool) for s in children(svc))
    listener = children(svc)[0]
    assert isinstance(listener.endpoint, ReusePortEndpoint)
    # Its heartbeats say which worker they come from.
    svc.heartbeat.startService()
    reactor.advance(0)
    wire = StringTransport()
    reactor.tcpClients[0][2].buildProtocol(None).makeConnection(wire)
    assert b'"worker": 1' in wire.value()
    svc.heartbeat.stopService()


RUN = ["-c", "from twisted.scripts.twistd import run; run()"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        # The systemd unit's command line.
        (
            ["twistd", "--nodaemon", "--pidfile=", "--reactor=cpvm", "cpvm", "--config", "/c"],
            ["--nodaemon", "--reactor=cpvm", "--nodaemon", "--pidfile=", "cpvm", "--config", "/c"],
        ),
        # The first process's pid file is its own; a worker daemonizes never.
        (["twistd", "--pidfile=/run/cpvm.pid", "cpvm"], ["--nodaemon", "--pidfile=", "cpvm"]),
        (
            ["twistd", "--pidfile", "/run/cpvm.pid", "-l", "/var/log/cpvm.log", "cpvm"],
            ["-l", "/var/log/cpvm.log", "--nodaemon", "--pidfile=", "cpvm"],
        ),
        # An option's value that reads "cpvm" is not the plugin.
        (
            ["twistd", "--reactor", "cpvm", "cpvm", "--config", "/c"],
            ["--reactor", "cpvm", "--nodaemon", "--pidfile=", "cpvm", "--config", "/c"],
        ),
        (
            ["twistd", "-r", "cpvm", "-n", "cpvm"],
            ["-r", "cpvm", "-n", "--nodaemon", "--pidfile=", "cpvm"],
        ),
        # No plugin name (python -c ...): the plugin is added.
        (["twistd"], ["--nodaemon", "--pidfile=", "cpvm"]),
    ],
)
def test_worker_argv(argv, expected):
    assert worker_argv(argv) == [*RUN, *expected]
