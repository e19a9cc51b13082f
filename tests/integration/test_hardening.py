"""Operator mistakes and hostile links against a real cpvm: a bad key on SIGHUP, a
plain-HTTP manager across the network, security headers on every answer."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import psutil
import pytest_twisted
from twisted.internet import reactor, task, threads

from tests.daemons import cpvm_config, http_get
from tests.peers import REPO_ROOT, free_port


async def wait_for(predicate, timeout=15.0, what="condition"):
    end = reactor.seconds() + timeout
    while reactor.seconds() < end:
        if await predicate():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def served_certificates(port: int, ca: str, connections: int = 24) -> set[bytes]:
    """The certificates (DER) that many fresh TLS connections get: with several workers
    the kernel spreads them over every process."""
    ctx = ssl.create_default_context(cafile=ca)
    seen = set()
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                seen.add(s.getpeercert(binary_form=True))
    return seen


def der(path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# -- SIGHUP with a key that does not match the certificate -------------------------------


@pytest_twisted.ensureDeferred
async def test_sighup_with_a_mismatched_key_keeps_the_old_pair(cpvm_factory, pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    cpvm = cpvm_factory(
        server={
            "tls": "true",
            "certificate": cert,
            "private_key": key,
            "workers": 2,
            "port": free_port(),
        }
    )
    first = psutil.Process(cpvm.pid)

    async def worker_serves():
        return len(first.children()) == 1 and any(
            c.status == psutil.CONN_LISTEN for c in first.children()[0].net_connections()
        )

    await wait_for(worker_serves, what="the second worker listening")
    ca = str(pki.ca_cert)
    old = der(cert)
    assert await threads.deferToThread(served_certificates, cpvm.port, ca) == {old}

    stranger = pki.issue_server_cert(tmp_path / "stranger").server_key
    shutil.copyfile(stranger, key)  # an operator's mistake: the wrong key for this cert
    os.kill(cpvm.pid, signal.SIGHUP)
    failed = "TLS reload failed, keeping the old certificate: the private key"

    async def both_refused():
        return cpvm.log_text().count(failed) == 2  # the first process, and its worker

    await wait_for(both_refused, what="both processes refusing the bad pair")
    log = cpvm.log_text()
    line = next(ln for ln in log.splitlines() if failed in ln)
    assert f"{key} does not match the certificate {cert}" in line
    assert "Traceback" not in log
    key_body = stranger.read_text().splitlines()[1:-1]
    assert not any(b in log for b in key_body), "key material in the log"
    # Everyone still gets a TLS session with the old certificate.
    assert await threads.deferToThread(served_certificates, cpvm.port, ca) == {old}
    assert cpvm.alive() and len(first.children()) == 1

    renewed = pki.issue_server_cert(tmp_path / "renewed")
    shutil.copyfile(renewed.server_cert, cert)
    shutil.copyfile(renewed.server_key, key)
    os.kill(cpvm.pid, signal.SIGHUP)

    async def all_renewed():
        return await threads.deferToThread(served_certificates, cpvm.port, ca) == {der(cert)}

    await wait_for(all_renewed, what="every process serving the renewed certificate")


# -- a plain-HTTP manager across the network ----------------------------------------------


def run_twistd_cpvm(config_text: str, tmp_path) -> subprocess.CompletedProcess:
    conf = tmp_path / "cpvm.conf"
    conf.write_text(config_text)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--reactor=cpvm",
            "cpvm",
            "--config",
            str(conf),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_plain_http_manager_off_loopback_is_refused_at_start(tmp_path, proxy_key):
    conf = cpvm_config("http://192.0.2.10:8250", credential_file=proxy_key[1])
    out = run_twistd_cpvm(conf, tmp_path)
    assert out.returncode != 0
    assert (
        f"{tmp_path / 'cpvm.conf'}: [manager] allow_plaintext: [manager] url "
        "'http://192.0.2.10:8250' is plain HTTP"
    ) in out.stderr + out.stdout
    assert proxy_key[0] not in out.stderr + out.stdout


def test_plain_http_manager_allowed_when_the_operator_says_so(cpvm_factory):
    # 192.0.2.10 (TEST-NET-1) never answers: cpvm starts and listens, not ready.
    cpvm = cpvm_factory(manager={"url": "http://192.0.2.10:8250", "allow_plaintext": "true"})
    assert cpvm.alive()
    assert http_get(cpvm.url("/readyz"))[0] == 503


# -- security headers on every answer ----------------------------------------------------

PATHS = (
    "/resource/noVNC/vnc.html",
    "/resource/noVNC/app/ui.js",
    "/resource/noVNC/",
    "/nothing-here",
    "/",
    "/healthz",
    "/readyz",
    "/metrics",
)


def answers(port: int, tls_ca: str | None = None) -> dict[str, tuple[int, dict[str, str]]]:
    """Status and headers (lower-case names) of a real GET of each of PATHS."""
    import http.client

    out = {}
    for path in PATHS:
        if tls_ca is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        else:
            ctx = ssl.create_default_context(cafile=tls_ca)
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            r.read()
            out[path] = (r.status, {k.lower(): v for k, v in r.getheaders()})
        finally:
            conn.close()
    return out


def test_every_answer_carries_the_security_headers(cpvm_factory):
    cpvm = cpvm_factory(server={"frame_ancestors": "'self' https://dash.example"})
    got = answers(cpvm.port)
    statuses = {p: s for p, (s, _) in got.items()}
    assert statuses.pop("/readyz") in (200, 503)  # 503 until the first heartbeat
    assert statuses == {
        "/resource/noVNC/vnc.html": 200,
        "/resource/noVNC/app/ui.js": 200,
        "/resource/noVNC/": 404,
        "/nothing-here": 404,
        "/": 404,
        "/healthz": 200,
        "/metrics": 200,
    }
    for path, (_, headers) in got.items():
        csp = headers.get("content-security-policy", "")
        assert f"connect-src 'self' ws://127.0.0.1:{cpvm.port};" in csp, path
        assert csp.endswith("frame-ancestors 'self' https://dash.example"), path
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, path
        assert headers.get("x-content-type-options") == "nosniff", path
        assert headers.get("referrer-policy") == "no-referrer", path
        assert "strict-transport-security" not in headers, path  # no HSTS over plain HTTP
        assert "x-frame-options" not in headers, path  # a list needs frame-ancestors


def test_hsts_and_frame_options_with_tls(cpvm_factory, pki):
    cpvm = cpvm_factory(
        server={"tls": "true", "certificate": pki.server_cert, "private_key": pki.server_key}
    )
    got = answers(cpvm.port, tls_ca=str(pki.ca_cert))
    for path, (_, headers) in got.items():
        assert headers.get("strict-transport-security") == "max-age=31536000", path
        assert headers.get("x-frame-options") == "SAMEORIGIN", path
        assert f"wss://127.0.0.1:{cpvm.port}" in headers["content-security-policy"], path
