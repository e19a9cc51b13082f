"""View-only consoles and viewer policies through a real cpvm process (the manager's
decision comes from the contract manager; tests/system has the real one).

cpvm enforces a view-only console: the browser's input never reaches the VNC server while
its screen traffic does. Under ``takeover`` the console a newer one replaced is closed
with its own code, from the redemption answer or from a heartbeat.
"""

from __future__ import annotations

import struct
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration import scripted_vnc
from tests.integration.test_browser import console_url
from tests.integration.test_console_path import (
    FBUR_FULL,
    full_update,
    open_session,
    sleep,
    ws_url,
)
from tests.integration.test_keys import open_and_type
from tests.peers import XVNC_TEST_PASSWORD
from tests.wsclient import open_console

KEY = lambda keysym, down=True: struct.pack("!BBxxI", 4, int(down), keysym)  # noqa: E731
POINTER = lambda x, y, buttons=0: struct.pack("!BBHH", 5, buttons, x, y)  # noqa: E731
VIEW_ONLY = {"view_only": True}
RETURN = 0xFF0D  # the Return keysym

# One of every client message cpvm knows, and whether a viewer's may pass.
SET_ENCODINGS = struct.pack("!BxHiiii", 2, 4, 0, -258, -316, -223)
EVERY_MESSAGE = [
    (b"\x00\x00\x00\x00" + scripted_vnc.TRUE_COLOUR, True),  # SetPixelFormat
    (SET_ENCODINGS, True),
    (FBUR_FULL(64, 48), True),
    (KEY(0x61), False),
    (POINTER(10, 10, 1), False),
    (POINTER(10, 10, 0x81) + b"\x01", False),  # extended PointerEvent (-316 was asked)
    (b"\x06\x00\x00\x00" + struct.pack("!I", 6) + b"secret", False),  # ClientCutText
    (b"\x96\x01\x00\x00\x00\x00\x00\x40\x00\x30", True),  # EnableContinuousUpdates
    (b"\xf8\x00\x00\x00" + struct.pack("!I", 0x80000002) + b"\x02ok", True),  # ClientFence
    (b"\xfa\x00\x01\x04", False),  # xvp reset: power control
    (b"\xfb\x00\x00\x40\x00\x30\x01\x00" + bytes(16), False),  # SetDesktopSize
    (b"\xfd\x80\x00\x02\x00\x01", False),  # gii version
    (struct.pack("!BBHII", 255, 0, 1, 0x61, 0x1E), False),  # QEMU extended key event
    (b"\xff\x01\x00\x00", True),  # QEMU audio enable
]


async def wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not check():
        await sleep(0.05)
    return bool(check())


def _read(path) -> str:
    return path.read_text() if path.exists() else ""


async def type_line(cpvm, manager, vnc, console, text: bytes) -> dict:
    """Open a console, point at the xterm (focus follows the pointer), type ``text`` and
    Return, then take a whole screen update (the server has read the keys by then)."""
    client, info, _ = await open_session(cpvm, manager, vnc, console=console)
    client.send(POINTER(200, 100))
    for keysym in [*text, RETURN]:
        client.send(KEY(keysym) + KEY(keysym, down=False))
    info = {**info, "pixels": await full_update(client, info)}
    assert client.close_info is None
    client.sendClose(1000)
    await client.wait_closed()
    return info


@pytest_twisted.ensureDeferred
async def test_view_only_keys_never_reach_xvnc_while_screen_updates_flow(
    cpvm, manager, xvnc, tmp_path
):
    typed, ready = tmp_path / "typed.txt", tmp_path / "ready"
    command = f"touch {ready}; exec cat > {typed}"
    xterm = xvnc.run_xterm("-geometry", "100x30+0+0", command=("sh", "-c", command))
    vnc = {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
    try:
        assert await wait_for(ready.exists, 15)  # the xterm's window is up
        # A full console first: the xterm is up and keys typed through cpvm reach it.
        await type_line(cpvm, manager, vnc, {}, b"ok")
        assert await wait_for(lambda: _read(typed) == "ok\n", 15), _read(typed)
        # A watcher types a line: the screen flows, the keys do not.
        info = await type_line(cpvm, manager, vnc, VIEW_ONLY, b"leak")
        assert info["pixels"] == info["width"] * info["height"]
        # A full console again: its line follows "ok" directly.
        await type_line(cpvm, manager, vnc, {}, b"end")
        assert await wait_for(lambda: _read(typed).count("\n") >= 2, 15), _read(typed)
        assert _read(typed) == "ok\nend\n"
    finally:
        xterm.terminate()


@pytest_twisted.ensureDeferred
async def test_view_only_passes_exactly_the_screen_messages(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    try:
        client, _, _ = await open_session(
            cpvm, manager, {"host": "127.0.0.1", "port": port}, console=VIEW_ONLY
        )
        stream = b"".join(m for m, _ in EVERY_MESSAGE)
        # Cut anywhere: every three bytes one WebSocket message.
        for i in range(0, len(stream), 3):
            client.send(stream[i : i + 3])
        expected = b"".join(m for m, passes in EVERY_MESSAGE if passes)
        server = factory.connections[0]
        assert await wait_for(lambda: len(server.received_bytes) >= len(expected))
        await sleep(0.3)  # anything dropped wrongly would have arrived by now too
        assert bytes(server.received_bytes) == expected
        assert server.shared_flag == 1
        assert client.close_info is None
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_view_only_fails_closed_on_a_message_it_cannot_size(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    try:
        client, _, issued = await open_session(
            cpvm, manager, {"host": "127.0.0.1", "port": port}, console=VIEW_ONLY
        )
        # UltraVNC's FileTransfer (7): its length is unknown, so is everything after it.
        client.send(FBUR_FULL(64, 48) + b"\x07\x00\x00\x00" + FBUR_FULL(64, 48) + KEY(0x61))
        closed = await client.wait_closed()
        assert (closed.code, closed.reason) == (
            4017,
            "view-only console: the browser sent a message cpvm cannot check",
        )
        assert bytes(factory.connections[0].received_bytes) == FBUR_FULL(64, 48)
        assert await wait_for(lambda: any(s == issued.session_id for s, _ in manager.ends))
        report = next(r for s, r in manager.ends if s == issued.session_id)
        assert report["reason"] == "view_only_uncheckable"
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_vnc_shared_flag_follows_the_policy(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    vnc = {"host": "127.0.0.1", "port": port}
    try:
        cases = [
            ({}, 0),  # shared: the browser's wish stands (here: unshared)
            (VIEW_ONLY, 1),  # a watcher never makes the server drop anyone
            ({"viewer_policy": "exclusive"}, 1),  # cpvm decides who is connected
            ({"viewer_policy": "takeover"}, 1),  # cpvm ends the old one itself, with 4023
        ]
        for console, flag in cases:
            token, _ = manager.issue(vnc, console=console)
            client = await open_console(ws_url(cpvm, token))
            await client.rfb_handshake(shared=False)
            assert factory.connections[-1].shared_flag == flag, console
            client.sendClose(1000)
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_takeover_ends_the_old_console_with_its_close_code(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    vnc = {"host": "127.0.0.1", "port": port}
    try:
        old, _, old_issued = await open_session(cpvm, manager, vnc)
        watcher, _, _ = await open_session(cpvm, manager, vnc, console=VIEW_ONLY)
        # The manager's redemption answer names the console this one takes over.
        new, _, _ = await open_session(
            cpvm,
            manager,
            vnc,
            console={"viewer_policy": "takeover", "taken_over": [old_issued.session_id]},
        )
        closed = await old.wait_closed()
        assert (closed.code, closed.reason) == (4023, "another console for this VM took over")
        assert watcher.close_info is None and new.close_info is None
        new.send(FBUR_FULL(64, 48))
        assert await wait_for(lambda: len(factory.connections[-1].received_bytes) == 10)
        assert await wait_for(lambda: any(s == old_issued.session_id for s, _ in manager.ends))
        report = next(r for s, r in manager.ends if s == old_issued.session_id)
        assert report["reason"] == "taken_over"
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_takeover_through_the_heartbeat(cpvm, manager):
    # The old console on this cpvm, the new one elsewhere: the heartbeat tells.
    port, _, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    try:
        old, _, issued = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": port})
        manager.taken_over = [issued.session_id]
        closed = await old.wait_closed()
        assert closed.code == 4023
    finally:
        await listening.stopListening()


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_novnc_view_only_typed_text_does_not_reach_the_xterm(cpvm, manager, xvnc, tmp_path):
    typed, ready = tmp_path / "typed.txt", tmp_path / "ready"
    command = f"touch {ready}; exec cat > {typed}"
    xterm = xvnc.run_xterm("-geometry", "100x30+0+0", command=("sh", "-c", command))
    vnc = {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
    try:
        assert await wait_for(ready.exists, 15)  # the xterm's window is up
        token, _ = manager.issue(vnc, console=VIEW_ONLY)
        # noVNC without its own view_only setting: it sends every key, cpvm must drop them.
        status = await threads.deferToThread(open_and_type, console_url(cpvm, token), "leaked\n")
        assert status.startswith("Connected")
        # The manager's URL also says view_only=1: noVNC then sends no input at all.
        token, _ = manager.issue(vnc, console=VIEW_ONLY)
        status = await threads.deferToThread(
            open_and_type, console_url(cpvm, token) + "&view_only=1", "leaked\n"
        )
        assert status.startswith("Connected")
        # A full console types into the same xterm: keys reach it when allowed.
        token, _ = manager.issue(vnc)
        await threads.deferToThread(open_and_type, console_url(cpvm, token), "typed\n")
        await wait_for(lambda: typed.exists() and typed.read_text().endswith("\n"), 15)
        assert typed.read_text() == "typed\n"
    finally:
        xterm.terminate()
