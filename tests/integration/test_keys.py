"""Keys as people type them: noVNC in Chromium, through cpvm, into QEMU and Xvnc.

A keyboard sends Shift down, the key, Shift up; Playwright's ``keyboard.type('"')`` sends
the key alone, which QEMU (keysym mode) turns into ``'``. These tests type the way a
keyboard does and assert the exact text. With QEMU, noVNC sends QEMU extended key events
(the keysym and the key's scancode) so the guest's own layout decides; cpvm must pass them
through unchanged, which a scripted server that records every client message checks.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.fuzz.rfb_targets import reference_messages
from tests.integration import scripted_vnc
from tests.integration.test_browser import CONNECTED, console_url
from tests.peers import GUEST_READY_MARKER, QEMU_TEST_PASSWORD, XVNC_TEST_PASSWORD, launch_chromium

pytestmark = pytest.mark.browser

SHIFTED_PUNCTUATION = '":_|()@#'

# A US keyboard: character -> (the key's code, Shift held).
_SHIFTED = {
    '"': "Quote",
    ":": "Semicolon",
    "_": "Minus",
    "|": "Backslash",
    "(": "Digit9",
    ")": "Digit0",
    "@": "Digit2",
    "#": "Digit3",
    ">": "Period",
}
_PLAIN = {"'": "Quote", " ": "Space", "/": "Slash", "\n": "Enter", ".": "Period", "-": "Minus"}


def key_for(char: str) -> tuple[str, bool]:
    """The key code a US keyboard sends for ``char`` and whether Shift is held."""
    if char in _SHIFTED:
        return _SHIFTED[char], True
    if char in _PLAIN:
        return _PLAIN[char], False
    if char.isdigit():
        return f"Digit{char}", False
    if char.isalpha() and char.isascii():
        return f"Key{char.upper()}", char.isupper()
    raise ValueError(f"no key for {char!r}")


def type_like_a_keyboard(page, text: str) -> None:
    """Shift down, the key, Shift up: what a person's keyboard sends for a shifted key."""
    for char in text:
        code, shift = key_for(char)
        if shift:
            page.keyboard.down("Shift")
        page.keyboard.press(code)
        if shift:
            page.keyboard.up("Shift")
        time.sleep(0.02)


def open_and_type(url: str, text: str, point=(200, 150)) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function(CONNECTED, timeout=30_000)
            status = page.inner_text("#noVNC_status")
            box = page.locator("#noVNC_container canvas").bounding_box()
            # No window manager in Xvnc: focus follows the pointer.
            page.mouse.move(box["x"] + point[0], box["y"] + point[1])
            page.mouse.click(box["x"] + point[0], box["y"] + point[1])
            time.sleep(0.5)
            type_like_a_keyboard(page, text)
            time.sleep(1.0)
            return status
        finally:
            browser.close()


async def wait_for(check, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await threads.deferToThread(time.sleep, 0.2)
    return check()


@pytest_twisted.ensureDeferred
async def test_shifted_punctuation_reaches_xvnc_exactly(cpvm, manager, xvnc, tmp_path):
    typed, ready = tmp_path / "typed.txt", tmp_path / "ready"
    command = f"touch {ready}; exec cat > {typed}"
    xterm = xvnc.run_xterm("-geometry", "100x30+0+0", command=("sh", "-c", command))
    try:
        assert await wait_for(ready.exists)  # the xterm's window is up
        token, _ = manager.issue(
            {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
        )
        status = await threads.deferToThread(
            open_and_type, console_url(cpvm, token), SHIFTED_PUNCTUATION + "\n"
        )
        assert status.startswith("Connected")
        await wait_for(lambda: _read(typed).endswith("\n"))
        assert _read(typed) == SHIFTED_PUNCTUATION + "\n"
    finally:
        xterm.terminate()


@pytest_twisted.ensureDeferred
async def test_shifted_punctuation_reaches_a_qemu_guest_exactly(cpvm, manager, qemu_guest):
    await threads.deferToThread(qemu_guest.wait_for_serial, GUEST_READY_MARKER, 45)
    token, _ = manager.issue(
        {"host": "127.0.0.1", "port": qemu_guest.port, "password": QEMU_TEST_PASSWORD}
    )
    # The guest's shell writes the line to its serial port, which QEMU logs to a file.
    command = f"echo '{SHIFTED_PUNCTUATION}' >/dev/ttyS0\n"
    status = await threads.deferToThread(open_and_type, console_url(cpvm, token), command)
    assert status.startswith("Connected")

    def lines() -> list[str]:
        return qemu_guest.serial_log.read_text(errors="replace").splitlines()

    # A line of exactly the text: with Shift lost, QEMU would have typed '';-\\90 23.
    assert await wait_for(lambda: SHIFTED_PUNCTUATION in lines()), lines()[-5:]


def qemu_key(down: bool, keysym: int, scancode: int) -> bytes:
    return struct.pack("!BBHII", 255, 0, int(down), keysym, scancode)


@pytest_twisted.ensureDeferred
async def test_qemu_extended_key_events_pass_through_unchanged(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.RecordingRfb)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": port})
        status = await threads.deferToThread(
            open_and_type, console_url(cpvm, token), '"a', (10, 10)
        )
        assert status.startswith("Connected")
        server = factory.connections[0]
        assert server.confirmed, "noVNC did not ask for QEMU extended key events"

        def keys() -> list[bytes]:
            stream = bytes(server.received_bytes)
            messages, stopped = reference_messages(stream)
            assert stopped is None
            return [
                stream[a:b] for a, b, _, _ in messages if stream[a] == 255 and stream[a + 1] == 0
            ]

        expected = [
            qemu_key(True, 0xFFE1, 0x2A),  # Shift_L, its scancode
            qemu_key(True, 0x22, 0x28),  # '"' on the Quote key
            qemu_key(False, 0x22, 0x28),
            qemu_key(False, 0xFFE1, 0x2A),
            qemu_key(True, 0x61, 0x1E),  # 'a'
            qemu_key(False, 0x61, 0x1E),
        ]
        await wait_for(lambda: len(keys()) >= len(expected))
        assert keys() == expected
        # Nothing typed went as a plain KeyEvent beside them.
        stream = bytes(server.received_bytes)
        messages, _ = reference_messages(stream)
        assert not [a for a, _, _, _ in messages if stream[a] == 4]
    finally:
        await listening.stopListening()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
