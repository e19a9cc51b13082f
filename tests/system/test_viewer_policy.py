"""Viewer policies end to end: the real manager (in the test's reactor), a real cpvm
process and a real VNC server (TigerVNC). ``exclusive`` refuses a second full console and
admits a view-only one; ``takeover`` closes the old console with its own code."""

from __future__ import annotations

import struct
import time

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.manager.harness import start_manager
from tests.manager.test_proxy_keys import proxies
from tests.peers import XVNC_TEST_PASSWORD, free_port
from tests.wsclient import RfbRefused, open_console


@pytest_twisted.async_yield_fixture
async def system(tmp_path, xvnc):
    """A manager with one account, a cpvm registered with it, and the Xvnc's port."""
    m = await start_manager(tmp_path / "manager")
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        m.secrets_seen.append(key_file.read_text().strip())
        port = free_port()
        text = cpvm_config(m.base, credential_file=key_file, server={"port": port})
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path)
        deadline = time.monotonic() + 20
        while proxies(m)["cpvm1"]["status"] != "up":
            assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
            await deferLater(reactor, 0.1)
        yield m, port, xvnc.port
    finally:
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        await m.stop()


def _vm(m, vnc_port: int, policy: str) -> str:
    return m.vm(
        "alice",
        password=XVNC_TEST_PASSWORD,
        vnc_host="127.0.0.1",
        vnc_port=str(vnc_port),
        viewer_policy=policy,
    )


async def _console(m, alice, vm, port, **params):
    answer = await m.endpoint(alice, vm, **params)
    return f"ws://127.0.0.1:{port}/websockify?token={answer['websocket']['token']}"


async def _screen(client, info) -> int:
    """One whole-screen update in raw encoding: the screen flows through this console."""
    client.send(struct.pack("!BBHi", 2, 0, 1, 0))
    client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, info["width"], info["height"]))
    head = await client.read(4)
    assert head[0] == 0
    pixels = 0
    for _ in range(struct.unpack("!H", head[2:4])[0]):
        _, _, w, h, _ = struct.unpack("!HHHHi", await client.read(12))
        await client.read(w * h * 4)
        pixels += w * h
    return pixels


@pytest_twisted.ensureDeferred
async def test_exclusive_refuses_a_second_full_console_but_admits_view_only(system):
    m, port, vnc_port = system
    alice = m.account("alice")
    vm = _vm(m, vnc_port, "exclusive")
    first = await open_console(await _console(m, alice, vm, port))
    info = await first.rfb_handshake()
    second_url = await _console(m, alice, vm, port)
    second = await open_console(second_url)
    with pytest.raises(RfbRefused, match="console in use by another person"):
        await second.rfb_handshake()
    assert (await second.wait_closed()).code == 4016
    watcher = await open_console(await _console(m, alice, vm, port, viewonly="true"))
    winfo = await watcher.rfb_handshake()
    assert await _screen(watcher, winfo) == winfo["width"] * winfo["height"]
    assert await _screen(first, info) > 0  # the person's console is untouched
    # Once the first console ends, the refused token (never spent) opens.
    first.sendClose(1000)
    await first.wait_closed()
    deadline = time.monotonic() + 15
    while True:
        again = await open_console(second_url)
        try:
            await again.rfb_handshake()
            break
        except RfbRefused as e:  # until the end report has reached the manager
            assert "in use" in str(e) and time.monotonic() < deadline
            await deferLater(reactor, 0.3)
    assert watcher.close_info is None
    for c in (again, watcher):
        c.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_takeover_closes_the_old_console_with_its_code(system):
    m, port, vnc_port = system
    alice = m.account("alice")
    vm = _vm(m, vnc_port, "takeover")
    old = await open_console(await _console(m, alice, vm, port))
    await old.rfb_handshake()
    watcher = await open_console(await _console(m, alice, vm, port, viewonly="true"))
    winfo = await watcher.rfb_handshake()
    new = await open_console(await _console(m, alice, vm, port))
    info = await new.rfb_handshake()
    closed = await old.wait_closed()
    assert (closed.code, closed.reason) == (4023, "another console for this VM took over")
    assert await _screen(new, info) > 0
    assert await _screen(watcher, winfo) > 0  # watchers stay
    # The manager's record says why the old one ended.
    deadline = time.monotonic() + 15
    while True:
        _, body = await m.api(alice, "listConsoleSessions", virtualmachineid=vm)
        reasons = [
            s.get("endreason") for s in body["listconsolesessionsresponse"]["consolesession"]
        ]
        if "taken_over" in reasons or time.monotonic() > deadline:
            break
        await deferLater(reactor, 0.3)
    assert reasons.count("taken_over") == 1
    for c in (new, watcher):
        c.sendClose(1000)
