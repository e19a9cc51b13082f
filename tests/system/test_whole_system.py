"""The whole system as the README's first command starts it: manager (SQLite), cpvm, a
demo VM under QEMU; a signed createConsoleEndpoint call; a console used once."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.parse

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.peers import REPO_ROOT, Supervised, free_port, launch_chromium, make_workdir
from tests.wsclient import RfbRefused, open_console


@pytest.fixture(scope="module")
def demo(demo_guest):
    workdir = make_workdir("demo")
    ports = {"http": free_port(), "manager": free_port()}
    url_file = workdir / "first-url.json"
    env = {**os.environ, "CPVM_DEMO_DIR": str(workdir / "state")}
    proc = Supervised(
        "demo",
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "demo.py"),
            "--http-port",
            str(ports["http"]),
            "--manager-port",
            str(ports["manager"]),
            "--vnc-display",
            str(_free_vnc_display()),
            "--url-file",
            str(url_file),
        ],
        workdir / "demo.log",
        env=env,
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 60
    while not url_file.exists() and time.monotonic() < deadline and not proc.exited():
        time.sleep(0.2)
    assert url_file.exists(), proc.log_tail()
    yield {
        "answer": json.loads(url_file.read_text()),
        "state": workdir / "state",
        "env": env,
        "ports": ports,
        "proc": proc,
    }
    proc.stop(grace=20)


def _free_vnc_display() -> int:
    import socket

    for display in range(60, 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + display))
            except OSError:
                continue
            return display
    raise RuntimeError("no free VNC display between :60 and :99")


def fresh_answer(demo) -> dict:
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), "url"],
        env=demo["env"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    url = out.stdout.strip()
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    path = query["path"][0]
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)["token"][0]
    return {"url": url, "token": token, "port": int(query["port"][0])}


def test_create_console_endpoint_answer_shape(demo):
    answer = demo["answer"]
    assert answer["success"] is True and answer["result"] is True
    ws = answer["websocket"]
    assert ws["host"] == "127.0.0.1" and ws["port"] == str(demo["ports"]["http"])
    assert ws["path"] == "websockify" and len(ws["token"]) >= 22
    assert answer["url"].startswith(
        f"http://127.0.0.1:{demo['ports']['http']}/resource/noVNC/vnc.html?"
    )


@pytest_twisted.ensureDeferred
async def test_signed_call_then_websocket_to_qemu_then_replay_refused(demo):
    a = fresh_answer(demo)
    url = f"ws://127.0.0.1:{a['port']}/websockify?token={a['token']}"
    client = await open_console(url)
    info = await client.rfb_handshake()
    assert info["name"] == b"demo-vm"
    client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, info["width"], info["height"]))
    head = await client.read(4)
    assert head[0] == 0  # a FramebufferUpdate from QEMU, through cpvm
    again = await open_console(url)
    with pytest.raises(RfbRefused, match="token already used"):
        await again.rfb_handshake()
    assert (await again.wait_closed()).code == 4003
    client.sendClose(1000)
    await client.wait_closed()


def _type_in_browser(url: str, text: str, shot) -> tuple[str, str]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function(
                "() => document.querySelector('#noVNC_status').textContent.startsWith('Connected')",
                timeout=30_000,
            )
            status = page.inner_text("#noVNC_status")
            page.locator("#noVNC_container canvas").click()
            page.keyboard.type(text, delay=30)
            page.keyboard.press("Enter")
            time.sleep(1.5)
            page.screenshot(path=str(shot))
            second = browser.new_page()
            second.goto(url)
            # The status fades after a while: take its text in the same check.
            refusal = second.wait_for_function(
                # A function, not an expression string: Playwright evaluates strings with
                # eval, which cpvm's Content-Security-Policy (rightly) forbids.
                "() => { const t = document.querySelector('#noVNC_status').textContent;"
                " return t.includes('rejected') ? t : false; }",
                timeout=30_000,
            )
            return status, refusal.json_value()
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_person_opens_the_console_types_and_cannot_reuse_it(demo, tmp_path):
    serial = demo["state"] / "serial.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and "cpvm-guest: shell ready" not in (
        serial.read_text(errors="replace") if serial.exists() else ""
    ):
        await threads.deferToThread(time.sleep, 0.5)
    a = fresh_answer(demo)
    # Letters and digits only: through QEMU, noVNC loses Shift ("serial" is in the guest).
    status, second = await threads.deferToThread(
        _type_in_browser, a["url"], "serial typed42", tmp_path / "demo.png"
    )
    assert status == "Connected (unencrypted) to demo-vm"
    assert second == "New connection has been rejected with reason: token already used"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "typed42" not in serial.read_text(errors="replace"):
        await threads.deferToThread(time.sleep, 0.3)
    assert "typed42" in serial.read_text(errors="replace")
