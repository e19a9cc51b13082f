"""``cpvm-probe`` against the real system: the manager (its real service and SQLite
database in the test's reactor), a real cpvm process and a real Xvnc; healthy, then with
each leg broken in turn.

The probe runs as its own process (``python -m cpvm.probe``, what the console script
calls), so its exit status and output are the ones a monitoring system sees.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.manager.harness import start_manager
from tests.manager.test_proxy_keys import proxies
from tests.peers import REPO_ROOT, XVNC_TEST_PASSWORD, free_port


@pytest_twisted.async_yield_fixture
async def system(request, tmp_path):
    """A manager, a cpvm registered with it, an account ``probe`` and its key file.
    Parametrized (indirect) with ``"tls"``: cpvm serves wss with the test PKI's leaf."""
    m = await start_manager(tmp_path / "manager")
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        m.secrets_seen.append(key_file.read_text().strip())
        server: dict = {"port": free_port()}
        if getattr(request, "param", None) == "tls":
            pki = request.getfixturevalue("pki")
            server.update(tls="true", certificate=pki.server_cert, private_key=pki.server_key)
        text = cpvm_config(m.base, credential_file=key_file, server=server)
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path)
        deadline = time.monotonic() + 20
        while proxies(m).get("cpvm1", {}).get("status") != "up":
            assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
            await deferLater(reactor, 0.1)
        creds = m.account("probe")
        credentials = tmp_path / "probe.json"
        credentials.write_text(json.dumps({"apikey": creds.api_key, "secretkey": creds.secret}))
        credentials.chmod(0o600)
        yield m, cpvm, credentials
    finally:
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        await m.stop()


def _vm(m, port: int, password: str) -> str:
    return m.vm("probe", name="canary", vnc_host="127.0.0.1", vnc_port=str(port), password=password)


async def probe(m, credentials: Path, vm: str, *extra: str) -> subprocess.CompletedProcess:
    """Run the probe in its own process while this reactor keeps serving the manager."""
    argv = [sys.executable, "-m", "cpvm.probe", "--manager", m.base, "--vm", vm]
    argv += ["--credentials", str(credentials), "--timeout", "8", *extra]
    done = await threads.deferToThread(
        subprocess.run,
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Whatever happened, nothing secret reaches the terminal or a monitoring log.
    for secret in m.secrets_seen:
        assert secret not in done.stdout + done.stderr
    assert "token=" not in done.stdout + done.stderr
    return done


@pytest_twisted.ensureDeferred
async def test_healthy_console_reports_every_leg(system, xvnc, tmp_path):
    m, _, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    textfile = tmp_path / "metrics" / "cpvm_probe.prom"
    textfile.parent.mkdir()
    done = await probe(m, credentials, vm, "--format", "json", "--textfile", str(textfile))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["healthy"] is True and report["failed_leg"] is None
    assert sorted(report["seconds"]) == ["api", "console", "first_update", "upgrade"]
    assert all(0 < s < 8 for s in report["seconds"].values())
    assert report["proxy"].startswith("127.0.0.1:") and report["desktop"] == "canary"
    assert report["first_update_pixels"] == 1024 * 768  # Xvnc's whole screen, raw
    prom = textfile.read_text()
    assert f'cpvm_probe_success{{vm="{vm}"}} 1.0' in prom
    assert f'cpvm_probe_leg_failed{{leg="console",vm="{vm}"}} 0.0' in prom
    assert 'cpvm_probe_leg_seconds{leg="first_update"' in prom
    assert [p.name for p in textfile.parent.iterdir()] == ["cpvm_probe.prom"]  # no temp left
    # The console was real: one session, acquired and ended by the browser side.
    deadline = time.monotonic() + 15
    while True:
        (session,) = json.loads(m.admin("--json", "session", "list", "--vm", vm))
        if session["reason"] is not None or time.monotonic() > deadline:
            break
        await deferLater(reactor, 0.2)
    assert session["account"] == "probe" and session["acquired"] != "-"
    assert session["reason"] == "client_closed"  # closed cleanly, as a person's browser does
    # Text, for a person.
    text = await probe(m, credentials, vm)
    assert text.returncode == 0 and text.stdout.startswith("cpvm-probe: healthy: VM " + vm)


@pytest_twisted.ensureDeferred
async def test_vnc_server_down_fails_the_console_leg(system, tmp_path):
    m, _, credentials = system
    vm = _vm(m, free_port(), XVNC_TEST_PASSWORD)  # nothing listens there
    done = await probe(m, credentials, vm, "--format", "json")
    assert done.returncode == 5, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["failed_leg"] == "console"
    assert report["reason"] == (
        "cpvm refused the console: 'VNC server unreachable' (close code 4011)"
    )
    assert sorted(report["seconds"]) == ["api", "upgrade"]


@pytest_twisted.ensureDeferred
async def test_wrong_vnc_password_fails_the_console_leg(system, xvnc, tmp_path):
    m, _, credentials = system
    vm = _vm(m, xvnc.port, "not-the-password")
    done = await probe(m, credentials, vm)
    assert done.returncode == 5, done.stdout + done.stderr
    assert done.stdout.startswith("cpvm-probe: FAILED at leg console")
    assert "'VNC authentication failed' (close code 4012)" in done.stdout
    assert "first_update  not reached" in done.stdout


@pytest_twisted.ensureDeferred
async def test_manager_down_fails_the_api_leg(system, xvnc, tmp_path):
    m, _, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    await m.stop()
    textfile = tmp_path / "cpvm_probe.prom"
    done = await probe(m, credentials, vm, "--textfile", str(textfile))
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("cpvm-probe: FAILED at leg api")
    assert f"manager unreachable at {m.base}/client/api" in done.stdout
    assert f'cpvm_probe_leg_failed{{leg="api",vm="{vm}"}} 1.0' in textfile.read_text()
    assert f'cpvm_probe_exit_status{{vm="{vm}"}} 3.0' in textfile.read_text()


@pytest_twisted.ensureDeferred
async def test_bad_key_fails_the_api_leg_with_the_managers_words(system, xvnc, tmp_path):
    m, _, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    wrong = tmp_path / "wrong.json"
    data = json.loads(credentials.read_text())
    wrong.write_text(json.dumps({**data, "secretkey": "x" + data["secretkey"][1:]}))
    done = await probe(m, wrong, vm)
    assert done.returncode == 3 and "manager answered HTTP 401" in done.stdout, done.stdout


@pytest_twisted.ensureDeferred
async def test_console_proxy_gone_fails_the_upgrade_leg(system, xvnc):
    m, cpvm, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    # Killed, not stopped: no last heartbeat, so the manager still sends browsers there
    # (until proxy_timeout), as after a crash.
    os.kill(cpvm.pid, signal.SIGKILL)
    await threads.deferToThread(cpvm.stop)
    done = await probe(m, credentials, vm, "--format", "json")
    assert done.returncode == 4, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["failed_leg"] == "upgrade" and "cannot connect to cpvm at" in report["reason"]
    assert sorted(report["seconds"]) == ["api"]


@pytest.mark.parametrize("system", ["tls"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_wss_is_verified_against_the_ca_given(system, xvnc, pki, tmp_path):
    m, _, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    done = await probe(m, credentials, vm, "--ca-file", str(pki.ca_cert), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["first_update_pixels"] == 1024 * 768
    # The system's CAs do not know the test CA: the upgrade leg fails, saying why.
    other = pki.other_ca(tmp_path / "other")
    done = await probe(m, credentials, vm, "--ca-file", str(other.ca_cert), "--format", "json")
    assert done.returncode == 4, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["failed_leg"] == "upgrade" and "certificate verify failed" in report["reason"]
