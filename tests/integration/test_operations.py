"""cpvm as operators run it: HTTP surface, metrics, logs, graceful stop, TLS reload, workers."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import time

import psutil
import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from tests.daemons import cpvm_config, http_get, start_cpvm
from tests.integration import scripted_vnc
from tests.peers import free_port
from tests.rawws import RawWebSocket
from tests.wsclient import open_console


@pytest.fixture
def echo_server():
    port, factory, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    yield port
    listening.stopListening()


async def session(cpvm, manager, port, scheme="ws", ca_pem=None):
    token, issued = manager.issue({"host": "127.0.0.1", "port": port})
    client = await open_console(
        f"{scheme}://127.0.0.1:{cpvm.port}/websockify?token={token}", ca_pem=ca_pem
    )
    await client.rfb_handshake()
    return client, token, issued


async def healthy(client, size=2000):
    probe = os.urandom(size)
    client.send(probe)
    assert await client.read(size) == probe


async def get(url):
    return await threads.deferToThread(http_get, url)


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    return raw_get_with(port, target)


def raw_get_with(port: int, target: str, *headers: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        extra = "".join(h + "\r\n" for h in headers)
        s.sendall(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    assert m, f"{name}{{{want}}} not in metrics"
    return float(m.group(1))


async def wait_for(predicate, timeout=10.0, what="condition"):
    end = reactor.seconds() + timeout
    while reactor.seconds() < end:
        if await predicate():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


# -- HTTP surface ------------------------------------------------------------------------


def test_novnc_health_and_404s(cpvm):
    status, body = http_get(cpvm.url("/resource/noVNC/vnc.html"))
    assert status == 200 and "noVNC" in body
    assert http_get(cpvm.url("/healthz")) == (200, "ok\n")
    for path in (
        "/",
        "/resource/",
        "/resource/noVNC/",
        "/resource/noVNC/app/",
        "/nothing-here",
        "/resource/noVNC/vnc.html.bak",
    ):
        assert http_get(cpvm.url(path))[0] == 404, path
    for target in (
        "/resource/noVNC/../../../../etc/passwd",
        "/resource/noVNC/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/resource/noVNC/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    ):
        status, raw = raw_get(cpvm.port, target)
        assert status in (400, 404) and b"root:" not in raw, target


def test_security_headers_on_novnc(cpvm):
    status, raw = raw_get(cpvm.port, "/resource/noVNC/vnc.html")
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert b"referrer-policy: no-referrer" in head
    assert b"x-content-type-options: nosniff" in head
    assert b"server: cpvm" in head and b"twisted" not in head


@pytest_twisted.ensureDeferred
async def test_readyz_follows_the_manager(cpvm, manager):
    await wait_for(lambda: _status(cpvm.url("/readyz"), 200), what="readyz 200")
    manager.down = True
    await wait_for(lambda: _status(cpvm.url("/readyz"), 503), what="readyz 503")
    manager.down = False
    await wait_for(lambda: _status(cpvm.url("/readyz"), 200), what="readyz 200 again")


async def _status(url, expected):
    return (await get(url))[0] == expected


@pytest_twisted.ensureDeferred
async def test_access_log_never_holds_tokens(cpvm, manager, echo_server):
    client, token, _ = await session(cpvm, manager, echo_server)
    await get(cpvm.url("/resource/noVNC/vnc.html?path=websockify%3Ftoken%3DSeCrEt123"))
    client.sendClose(1000)
    await client.wait_closed()
    await task.deferLater(reactor, 0.5, lambda: None)
    log = cpvm.log_text()
    assert '"GET /resource/noVNC/vnc.html HTTP/1.1" 200' in log
    assert "console session acquired" in log
    assert token not in log and "SeCrEt123" not in log


@pytest_twisted.ensureDeferred
async def test_compression_offer_declined_and_session_works(cpvm, manager, echo_server):
    # Chromium offers permessage-deflate on every upgrade; cpvm declines (RFB encodings
    # compress already) and the session goes on uncompressed.
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})

    def browser():
        ws = RawWebSocket(
            "127.0.0.1",
            cpvm.port,
            f"/websockify?token={token}",
            headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"},
        )
        try:
            ws.rfb_handshake()
            ws.send(b"ping")
            return ws.response_head, ws.read_message_bytes(4)
        finally:
            ws.close()

    head, echoed = await threads.deferToThread(browser)
    assert b"sec-websocket-extensions" not in head.lower()
    assert echoed == b"ping"


# -- metrics -----------------------------------------------------------------------------


def test_metrics_only_for_allowed_addresses(cpvm_factory):
    # The default allows loopback only (the other tests scrape from 127.0.0.1).
    cpvm = cpvm_factory(
        metrics={"allow": "192.0.2.0/24, 2001:db8::/32"}, server={"trusted_proxies": "127.0.0.1"}
    )
    status, text = http_get(cpvm.url("/metrics"))
    assert status == 404 and "cpvm_" not in text
    # Even from a trusted proxy the forwarded-for header proves nothing: the TCP peer
    # decides (the scraper talks to each cpvm directly).
    status, _ = raw_get_with(cpvm.port, "/metrics", "X-Forwarded-For: 192.0.2.7")
    assert status == 404
    assert http_get(cpvm.url("/healthz"))[0] == 200
    cpvm = cpvm_factory(metrics={"enabled": "false"})
    assert http_get(cpvm.url("/metrics"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_metrics_follow_sessions(cpvm, manager, echo_server):
    before = (await get(cpvm.url("/metrics")))[1]
    assert metric(before, "cpvm_active_sessions") == 0
    client, _, _ = await session(cpvm, manager, echo_server)
    await healthy(client, 10_000)
    during = (await get(cpvm.url("/metrics")))[1]
    assert metric(during, "cpvm_active_sessions") == 1
    assert metric(during, "cpvm_token_redemptions_total", result="ok") == 1
    assert metric(during, "cpvm_relayed_bytes_total", direction="to_server") >= 10_000
    assert metric(during, "cpvm_rfb_handshake_seconds_count") == 1
    with pytest.raises(ConnectionError):
        await open_console(
            f"ws://127.0.0.1:{cpvm.port}/websockify?token=x", origin="https://evil.example"
        )
    client.sendClose(1000)
    await client.wait_closed()

    async def ended():
        text = (await get(cpvm.url("/metrics")))[1]
        return metric(text, "cpvm_active_sessions") == 0

    await wait_for(ended, what="active sessions back to 0")
    after = (await get(cpvm.url("/metrics")))[1]
    assert metric(after, "cpvm_sessions_total", outcome="client_closed") == 1
    assert metric(after, "cpvm_relayed_bytes_total", direction="to_client") >= 10_000
    assert metric(after, "cpvm_websocket_refused_total", reason="origin not allowed") == 1
    assert metric(after, "cpvm_token_redemption_seconds_count") == 1


# -- logs --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_json_logs_and_audit_file(cpvm_factory, manager, echo_server, tmp_path):
    audit = tmp_path / "audit.jsonl"
    cpvm = cpvm_factory(log={"format": "json", "audit_file": audit})
    client, token, issued = await session(cpvm, manager, echo_server)
    await healthy(client)
    client.sendClose(1000)
    await client.wait_closed()
    await task.deferLater(reactor, 0.5, lambda: None)
    records = [json.loads(line) for line in cpvm.log_text().splitlines() if line.strip()]
    assert records and all("message" in r and "level" in r for r in records)
    ended = [r for r in records if r.get("event") == "ended"]
    assert ended and ended[0]["session"] == issued.session_id
    assert ended[0]["client"] == "127.0.0.1" and ended[0]["reason"] == "client_closed"
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events] == ["acquired", "ended"]
    assert events[1]["bytes_to_server"] >= 2000
    assert token not in audit.read_text() and token not in cpvm.log_text()
    # Started like the units, on cpvm's reactor.
    assert "cpvm.proxy.reactor.RelayReactor" in cpvm.log_text()


# -- graceful stop and TLS reload --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_with_1001(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(server={"grace_period": 3})
    client, _, issued = await session(cpvm, manager, echo_server)
    os.kill(cpvm.pid, signal.SIGTERM)
    closed = await client.wait_closed(timeout=10)
    assert closed.code == 1001 and closed.reason == "cpvm is shutting down"
    started = reactor.seconds()
    await wait_for(lambda: _exited(cpvm), timeout=8, what="cpvm exit")
    assert reactor.seconds() - started < 3 + 2
    assert any(sid == issued.session_id and r["reason"] == "shutdown" for sid, r in manager.ends)


async def _exited(daemon):
    return not daemon.alive()


def _peer_cert(port: int, ca: str) -> bytes:
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True)


def _der(pem_path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem_path.read_text())


@pytest_twisted.ensureDeferred
async def test_tls_and_sighup_certificate_reload(cpvm_factory, manager, echo_server, pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    cpvm = cpvm_factory(server={"tls": "true", "certificate": cert, "private_key": key})
    ca = str(pki.ca_cert)
    assert await threads.deferToThread(_peer_cert, cpvm.port, ca) == _der(cert)
    client, _, _ = await session(cpvm, manager, echo_server, scheme="wss", ca_pem=pki.ca_cert_pem)
    await healthy(client)
    renewed = pki.issue_server_cert(tmp_path / "renewed")
    cert.write_bytes(renewed.server_cert.read_bytes())
    key.write_bytes(renewed.server_key.read_bytes())
    os.kill(cpvm.pid, signal.SIGHUP)

    async def reloaded():
        return await threads.deferToThread(_peer_cert, cpvm.port, ca) == _der(cert)

    await wait_for(reloaded, what="the renewed certificate")
    await healthy(client)  # the session opened before the reload is still up
    assert cpvm.alive()


# -- several workers ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_port(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(server={"workers": 2, "port": free_port()})
    first = psutil.Process(cpvm.pid)

    async def two_processes():
        # Listening, not only started: under load a worker takes seconds to bind.
        return len(first.children()) == 1 and any(
            c.status == psutil.CONN_LISTEN for c in first.children()[0].net_connections()
        )

    await wait_for(two_processes, what="the second worker listening")
    pids = {cpvm.pid, first.children()[0].pid}
    clients = [(await session(cpvm, manager, echo_server))[0] for _ in range(16)]
    for c in clients:
        await healthy(c, 100)
    owners = set()
    for pid in pids:
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == echo_server:
                owners.add(pid)
    assert owners == pids, "sessions landed on only one worker"
    # Whichever process answers a scrape, it counts every process's sessions.
    shared = psutil.Process(first.children()[0].pid).environ()["PROMETHEUS_MULTIPROC_DIR"]
    for _ in range(8):
        text = (await get(cpvm.url("/metrics")))[1]
        assert metric(text, "cpvm_active_sessions") == 16
        assert metric(text, "cpvm_token_redemptions_total", result="ok") == 16
        assert metric(text, "cpvm_rfb_handshake_seconds_count") == 16
    for c in clients:
        c.sendClose(1000)
        await c.wait_closed()

    async def all_ended():
        text = (await get(cpvm.url("/metrics")))[1]
        return (
            metric(text, "cpvm_active_sessions") == 0
            and metric(text, "cpvm_sessions_total", outcome="client_closed") == 16
        )

    await wait_for(all_ended, what="every worker's sessions counted as ended")
    text = (await get(cpvm.url("/metrics")))[1]
    assert metric(text, "cpvm_relayed_bytes_total", direction="to_server") >= 16 * 100
    os.kill(cpvm.pid, signal.SIGTERM)
    await wait_for(lambda: _exited(cpvm), timeout=15, what="cpvm exit")
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert not os.path.exists(shared), "the shared metrics directory outlived cpvm"


@pytest_twisted.ensureDeferred
async def test_workers_start_with_a_two_word_pidfile_option(manager, proxy_key, tmp_path):
    # "--pidfile PATH": a worker's command line once dropped the option but kept PATH,
    # which twistd then took for the plugin's name: every worker died at start.
    port = free_port()
    pidfile = tmp_path / "cpvm.pid"
    text = cpvm_config(
        manager.url, credential_file=proxy_key[1], server={"workers": 2, "port": port}
    )
    (tmp_path / "cpvm").mkdir()
    cpvm = start_cpvm(text, workdir=tmp_path / "cpvm", extra_args=("--pidfile", str(pidfile)))
    try:
        first = psutil.Process(cpvm.pid)

        async def worker_listens():
            return any(
                c.status == psutil.CONN_LISTEN and c.laddr.port == port
                for w in first.children()
                for c in w.net_connections(kind="tcp")
            )

        await wait_for(worker_listens, timeout=20, what="the second worker on the port")
        [worker] = first.children()
        assert "--pidfile=" in worker.cmdline() and str(pidfile) not in worker.cmdline()
        assert pidfile.read_text().strip() == str(cpvm.pid)  # the first process's own
    finally:
        cpvm.stop()


def _slow_loris(port: int, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait + 5) as s:
        s.sendall(b"GET /websockify?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(wait)
        try:
            return s.recv(100)
        except ConnectionError:
            return b""


@pytest_twisted.ensureDeferred
async def test_unfinished_requests_are_dropped_but_sessions_live_on(
    cpvm_factory, manager, echo_server
):
    cpvm = cpvm_factory(session={"websocket_handshake_timeout": 1})
    client, _, _ = await session(cpvm, manager, echo_server)
    # The half-sent request is cut off by cpvm with a 408 (see test_slowloris.py).
    answer = await threads.deferToThread(_slow_loris, cpvm.port, 2.5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    await healthy(client)  # a session older than the timeout is unaffected
