"""noVNC in headless Chromium, through a real cpvm, to a real VNC server.

Playwright's sync API runs in a worker thread so the test reactor keeps serving the
contract manager that cpvm redeems tokens with.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration import scripted_vnc
from tests.peers import XVNC_TEST_PASSWORD, launch_chromium

pytestmark = pytest.mark.browser

# Waits are functions, never expression strings: Playwright polls a string with eval,
# which cpvm's Content-Security-Policy (rightly) forbids.
CONNECTED = (
    "() => !!document.querySelector('#noVNC_status') && "
    "document.querySelector('#noVNC_status').textContent.startsWith('Connected')"
)


# Records every Content-Security-Policy violation the page reports.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener('securitypolicyviolation', e =>
    window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));
"""


def console_url(cpvm, token: str) -> str:
    path = urllib.parse.quote(f"websockify?token={token}", safe="")
    return (
        f"http://127.0.0.1:{cpvm.port}/resource/noVNC/vnc.html?autoconnect=true"
        f"&reconnect=false&host=127.0.0.1&port={cpvm.port}&path={path}"
    )


def type_into_console(url: str, text: str, screenshot: Path, point=(200, 150)) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.add_init_script(RECORD_VIOLATIONS)
            page.goto(url)
            page.wait_for_function(CONNECTED, timeout=30_000)
            status = page.inner_text("#noVNC_status")
            canvas = page.locator("#noVNC_container canvas")
            box = canvas.bounding_box()
            # No window manager in Xvnc: focus follows the pointer, so hover the xterm.
            page.mouse.move(box["x"] + point[0], box["y"] + point[1])
            page.mouse.click(box["x"] + point[0], box["y"] + point[1])
            time.sleep(0.5)
            page.keyboard.type(text, delay=20)
            time.sleep(1.0)
            page.screenshot(path=str(screenshot))
            # cpvm's Content-Security-Policy leaves everything noVNC does alone.
            assert page.evaluate("window.__violations") == []
            return status
        finally:
            browser.close()


def second_visit(url: str) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.goto(url)
            # The status fades after a while: take its text in the same check.
            status = page.wait_for_function(
                "() => { const t = document.querySelector('#noVNC_status').textContent;"
                " return t && !t.startsWith('Connecting') ? t : false; }",
                timeout=30_000,
            )
            return status.json_value()
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_typed_text_reaches_a_program_in_the_vnc_desktop(cpvm, manager, xvnc, tmp_path):
    typed_file = tmp_path / "typed.txt"
    xterm = xvnc.run_xterm("-geometry", "100x30+0+0", command=("sh", "-c", f"cat > {typed_file}"))
    try:
        token, _ = manager.issue(
            {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD},
            vm_name="xvnc-desktop",
        )
        url = console_url(cpvm, token)
        shot = tmp_path / "console.png"
        status = await threads.deferToThread(type_into_console, url, "hello cpvm 42\n", shot)
        assert status.startswith("Connected") and "xvnc-desktop" in status
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "hello cpvm 42" not in _read(typed_file):
            await threads.deferToThread(time.sleep, 0.2)
        assert _read(typed_file) == "hello cpvm 42\n"
        # The screenshot shows the desktop: a real PNG of the page with the canvas.
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        # The same URL a second time: noVNC shows cpvm's refusal reason.
        again = await threads.deferToThread(second_visit, url)
        assert again == "New connection has been rejected with reason: token already used"
    finally:
        xterm.terminate()


def follow_hostile_link(url: str, connected) -> dict:
    """Open ``url``; wait until the page connected elsewhere, reported a violation, or
    noVNC gave up connecting."""
    from playwright.sync_api import sync_playwright

    settled = (
        "window.__violations.length > 0 || (() => {"
        " const t = document.querySelector('#noVNC_status').textContent;"
        " return !!t && !t.startsWith('Connecting'); })()"
    )
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_VIOLATIONS)
            page.goto(url)
            deadline = time.monotonic() + 30
            while not (connected() or page.evaluate(settled)):
                assert time.monotonic() < deadline, "the page neither connected nor failed"
                time.sleep(0.1)
            time.sleep(1.0)  # anything still on its way reaches the listener meanwhile
            return {
                "violations": page.evaluate("window.__violations"),
                "status": page.inner_text("#noVNC_status"),
            }
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_a_link_cannot_point_the_console_at_another_websocket(cpvm):
    # The attacker's WebSocket: a listener that only records who connected.
    port, listener, listening = scripted_vnc.listen(scripted_vnc.Hanging)
    try:
        path = urllib.parse.quote("websockify?token=stolen-keys-go-here", safe="")
        url = (
            f"http://127.0.0.1:{cpvm.port}/resource/noVNC/vnc.html?autoconnect=true"
            f"&reconnect=false&host=127.0.0.1&port={port}&path={path}"
        )
        seen = await threads.deferToThread(
            follow_hostile_link, url, lambda: bool(listener.connections)
        )
        assert listener.connections == [], "the page connected to the other WebSocket"
        assert seen["violations"] == [
            f"connect-src ws://127.0.0.1:{port}/websockify?token=stolen-keys-go-here"
        ], seen
    finally:
        await listening.stopListening()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
