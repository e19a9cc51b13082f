"""A cpvm restart under an open console: the session ends ``shutdown`` (an unclean end),
and the same browser — the one holding its console cookie — resumes it on the restarted
cpvm with the token it already has; anyone else with the token is refused.

The real manager runs in the test's reactor (tests/manager/harness.py), cpvm is a real
``twistd`` process stopped with SIGTERM and started again on the same port with the same
state directory (so the same instance id), Xvnc is the VM. The browser is the raw
WebSocket client of tests/wsclient.py sending the ``Cookie`` header a browser would.
"""

from __future__ import annotations

import tempfile
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from cpvm.proxy import browser_cookie
from tests.daemons import cpvm_config, start_cpvm
from tests.manager.harness import start_manager
from tests.peers import HOST, XVNC_TEST_PASSWORD, free_port
from tests.wsclient import RfbRefused, open_console


async def _record(m, alice) -> dict:
    status, body = await m.api(alice, "listConsoleSessions")
    assert status == 200, body
    (record,) = body["listconsolesessionsresponse"]["consolesession"]
    return record


async def _until(m, alice, check, what: str, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        record = await _record(m, alice)
        if check(record):
            return record
        assert time.monotonic() < deadline, f"{what}: {record}"
        await deferLater(reactor, 0.1)


@pytest_twisted.ensureDeferred
async def test_a_console_survives_a_cpvm_restart_for_its_own_browser_only(tmp_path, xvnc):
    m = await start_manager(
        tmp_path / "manager",
        {"proxies": {"heartbeat_interval": "1", "proxy_timeout": "5"}},
    )
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        port = free_port()
        # The same port and state directory (instance id) before and after the restart.
        text = cpvm_config(
            m.base,
            credential_file=key_file,
            server={"port": port, "state_directory": tempfile.mkdtemp(prefix="cpvm-state-")},
        )
        (tmp_path / "first").mkdir()
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path / "first")
        alice = m.account("alice")
        vm = m.vm(
            "alice",
            name="xvnc-desktop",
            password=XVNC_TEST_PASSWORD,
            vnc_host=HOST,
            vnc_port=str(xvnc.port),
        )
        deadline = time.monotonic() + 20
        while not (answer := await m.endpoint(alice, vm))["success"]:
            assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
            await deferLater(reactor, 0.2)
        url = f"ws://{HOST}:{port}/websockify?token={answer['websocket']['token']}"
        own = {"Cookie": f"cpvm_console={browser_cookie.new_value()}"}
        first = await open_console(url, headers=own)
        assert (await first.rfb_handshake())["name"] == b"xvnc-desktop"
        sid = (await _record(m, alice))["id"]

        await threads.deferToThread(cpvm.stop)  # SIGTERM: close 1001, a last heartbeat
        assert (await first.wait_closed()).code == 1001
        lost = await _until(m, alice, lambda r: "ended" in r, "the end never arrived")
        assert lost["endreason"] == "shutdown"

        (tmp_path / "second").mkdir()
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path / "second")
        # Someone else with the same URL (another cookie, or none): a used token.
        for headers in ({"Cookie": f"cpvm_console={browser_cookie.new_value()}"}, {}):
            other = await open_console(url, headers=headers)
            with pytest.raises(RfbRefused, match="token already used"):
                await other.rfb_handshake()
            assert (await other.wait_closed()).code == 4003
        # The browser that held the console gets it back, the same session.
        again = await open_console(url, headers=own)
        assert (await again.rfb_handshake())["name"] == b"xvnc-desktop"
        record = await _record(m, alice)
        assert record["id"] == sid and record["reconnects"] == 1 and "ended" not in record
        again.sendClose(1000)
        await again.wait_closed()
        ended = await _until(m, alice, lambda r: "ended" in r, "the clean end never arrived")
        assert ended["endreason"] == "client_closed" and ended["reconnects"] == 1
    finally:
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
        await m.stop()
