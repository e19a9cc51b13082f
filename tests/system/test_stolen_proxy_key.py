"""The real manager and a real cpvm (``twistd cpvm``) against a stolen proxy key, and a
console whose account lost the VM between createConsoleEndpoint and the browser.

The manager runs in the test's reactor (tests/manager/harness.py, its real HTTP listener
and SQLite database); cpvm is its own process, reading the key file that
``proxy-key create --output`` wrote. The attacker calls from 127.0.0.2 (all of 127/8 is
local on Linux), outside the key's allowed 127.0.0.1/32.
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.manager.harness import start_manager
from tests.manager.test_proxy_keys import OUTSIDER, beat, proxies, proxy_from
from tests.peers import free_port
from tests.wsclient import RfbRefused, open_console


@pytest_twisted.async_yield_fixture
async def system(tmp_path):
    """A manager, one account with a VM, and a cpvm registered with a restricted key."""
    m = await start_manager(tmp_path / "manager")
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin(
            "proxy-key",
            "create",
            "--name",
            "cpvm1",
            "--output",
            str(key_file),
            "--allow",
            "127.0.0.1/32",
            "--max-capacity",
            "100",
        )
        key = key_file.read_text().strip()
        m.secrets_seen.append(key)
        port = free_port()
        text = cpvm_config(m.base, credential_file=key_file, server={"port": port})
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path)
        deadline = time.monotonic() + 20
        while proxies(m)["cpvm1"]["status"] != "up":
            assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
            await deferLater(reactor, 0.1)
        yield m, cpvm, key, port
    finally:
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        await m.stop()


@pytest_twisted.ensureDeferred
async def test_stolen_key_does_not_capture_new_consoles(system):
    m, cpvm, key, port = system
    alice = m.account("alice")
    vm = m.vm("alice")
    # The stolen key from another network: refused, however much it claims.
    status, body = await proxy_from(m, OUTSIDER, key, "heartbeat", beat("evil.example", 10**7))
    assert (status, body["error"]) == (403, "source_not_allowed")
    # A second key stolen, with no network restriction: its ceiling of 1 holds.
    other = m.admin("proxy-key", "create", "--name", "spare", "--max-capacity", "1").strip()
    m.secrets_seen.append(other)
    status, _ = await proxy_from(m, OUTSIDER, other, "heartbeat", beat("evil.example", 10**7))
    assert status == 200
    hosts = [(await m.endpoint(alice, vm))["websocket"] for _ in range(10)]
    assert sum(h["host"] == "evil.example" for h in hosts) <= 1
    real = [h for h in hosts if h["host"] == "127.0.0.1"]
    assert len(real) >= 9 and all(h["port"] == str(port) for h in real)
    listed = proxies(m)["cpvm1"]
    assert (listed["max_capacity"], listed["allow"]) == (100, "127.0.0.1/32")
    assert listed["load"].endswith("/100")  # cpvm claims 1000, counted as 100
    assert key.split(".", 1)[1] not in m.admin("proxy", "list")


@pytest.mark.parametrize("change", ["disable account", "move VM"])
@pytest_twisted.ensureDeferred
async def test_browser_refused_when_account_lost_the_vm(system, change):
    m, cpvm, key, port = system
    alice = m.account("alice")
    m.account("bob")
    vm = m.vm("alice")
    answer = await m.endpoint(alice, vm)
    if change == "disable account":
        m.admin("account", "disable", "alice")
    else:
        m.admin("vm", "update", vm, "--owner", "bob")
    ws = answer["websocket"]
    client = await open_console(f"ws://127.0.0.1:{ws['port']}/websockify?token={ws['token']}")
    with pytest.raises(RfbRefused, match="account disabled or no longer owns the VM"):
        await client.rfb_handshake()
    closed = await client.wait_closed()
    assert (closed.code, closed.reason) == (4009, "account disabled or no longer owns the VM")
