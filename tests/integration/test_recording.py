"""Session recording through a real cpvm process (docs/recording.md).

The echo VNC server sends back exactly what the client sends, so the recording's stream
after the synthetic handshake must be those bytes, byte for byte, read by the independent
FBS reader. A small tmpfs this test mounts is the full disk. The browser test records a
person typing into an xterm on Xvnc and plays the recording back in Chromium.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.fbs_reader import parse_handshake, read_fbs
from tests.integration import scripted_vnc
from tests.wsclient import open_console

MARKER = "\u25cf REC "


def ws_url(cpvm, token):
    return f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}"


def key_events(n: int) -> bytes:
    """``n`` KeyEvent messages: real client messages, so cpvm's scanner stays in step."""
    return b"".join(b"\x04\x01\x00\x00" + os.urandom(4) for _ in range(n))


@pytest.fixture
def echo_vnc():
    port, _factory, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    yield port
    listening.stopListening()


async def until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.1, lambda: None)


def end_report(manager, session_id):
    return next((r for sid, r in manager.ends if sid == session_id), None)


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs: a disk that fills during the session."""
    path = tmp_path / "small-disk"
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=192k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


@pytest_twisted.ensureDeferred
async def test_the_recording_is_the_server_stream_byte_for_byte(
    cpvm_factory, manager, echo_vnc, tmp_path
):
    directory = tmp_path / "recordings"
    cpvm = cpvm_factory(recording={"directory": directory, "record_input": "true"})
    token, issued = manager.issue(
        {"host": "127.0.0.1", "port": echo_vnc}, vm_name="echo-vm", recording=True
    )
    client = await open_console(ws_url(cpvm, token))
    init = await client.rfb_handshake()
    # The person is told: the desktop name noVNC shows carries the marker.
    assert init["name"] == (MARKER + "echo-vm").encode()
    sent = b""
    for size in (1, 7, 300, 4096, 8000, 3):  # noVNC-sized messages (cpvm takes 64 KiB)
        chunk = key_events(size)
        client.send(chunk)
        assert await client.read(len(chunk)) == chunk
        sent += chunk
    client.sendClose(1000)
    await client.wait_closed()
    report = await until(lambda: end_report(manager, issued.session_id), "the end report")

    path = directory / f"{issued.session_id}.fbs"
    raw = path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert report["recording"] == {
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "duration": report["recording"]["duration"],
        "complete": True,
    }
    assert 0 < report["recording"]["duration"] <= report["duration"] + 0.01
    parsed = read_fbs(raw)
    assert not parsed.truncated
    hs = parse_handshake(parsed.stream())
    assert (hs.version, hs.width, hs.height) == (b"RFB 003.003\n", 64, 48)
    assert hs.name == (MARKER + "echo-vm").encode()
    assert hs.rest == sent
    stamps = [b.timestamp_ms for b in parsed.blocks]
    assert stamps == sorted(stamps) and stamps[0] == 0
    # record_input: the browser's side, same clock, in the side file.
    side = read_fbs((directory / f"{issued.session_id}.input.fbs").read_bytes())
    assert side.stream() == sent


@pytest_twisted.ensureDeferred
async def test_an_unrecorded_session_leaves_no_file(cpvm_factory, manager, echo_vnc, tmp_path):
    directory = tmp_path / "recordings"
    cpvm = cpvm_factory(recording={"directory": directory})
    token, issued = manager.issue({"host": "127.0.0.1", "port": echo_vnc}, vm_name="plain")
    client = await open_console(ws_url(cpvm, token))
    assert (await client.rfb_handshake())["name"] == b"plain"
    client.sendClose(1000)
    await client.wait_closed()
    report = await until(lambda: end_report(manager, issued.session_id), "the end report")
    assert "recording" not in report
    assert not directory.exists()  # nothing recorded: not even the directory


async def fill_the_disk(client, limit: int = 4 << 20) -> int:
    """Send echo traffic until cpvm closes the console or ``limit`` bytes went through."""
    sent = 0
    while sent < limit and client.close_info is None:
        chunk = key_events(4096)
        client.send(chunk)
        try:
            await client.read(len(chunk))
        except ConnectionError:
            break
        sent += len(chunk)
    return sent


@pytest_twisted.ensureDeferred
async def test_disk_full_ends_the_session_with_its_code(
    cpvm_factory, manager, echo_vnc, small_disk
):
    cpvm = cpvm_factory(recording={"directory": small_disk, "on_failure": "end"})
    token, issued = manager.issue({"host": "127.0.0.1", "port": echo_vnc}, recording=True)
    client = await open_console(ws_url(cpvm, token))
    await client.rfb_handshake()
    sent = await fill_the_disk(client)
    closed = await client.wait_closed()
    assert closed.code == 4024, (closed, sent)
    assert sent < 4 << 20
    report = await until(lambda: end_report(manager, issued.session_id), "the end report")
    assert report["reason"] == "recording_failed"
    assert report["recording"]["complete"] is False
    # What is on the disk is a readable recording up to its last whole block.
    raw = (small_disk / f"{issued.session_id}.fbs").read_bytes()
    assert not read_fbs(raw).truncated
    assert report["recording"]["sha256"] == hashlib.sha256(raw).hexdigest()
    # The audit says why.
    log = await until(lambda: "recording_failed" in cpvm.log_text() and cpvm.log_text(), "the log")
    assert "ENOSPC" in log and "recording" in log


@pytest_twisted.ensureDeferred
async def test_disk_full_with_continue_keeps_the_console(
    cpvm_factory, manager, echo_vnc, small_disk
):
    cpvm = cpvm_factory(recording={"directory": small_disk, "on_failure": "continue"})
    token, issued = manager.issue({"host": "127.0.0.1", "port": echo_vnc}, recording=True)
    client = await open_console(ws_url(cpvm, token))
    await client.rfb_handshake()
    sent = await fill_the_disk(client, limit=1 << 20)
    assert sent >= 1 << 20 and client.close_info is None  # far past the disk's 192 KiB
    client.sendClose(1000)
    await client.wait_closed()
    report = await until(lambda: end_report(manager, issued.session_id), "the end report")
    assert report["reason"] == "client_closed"
    assert report["recording"]["complete"] is False
    assert "incomplete" in cpvm.log_text()


@pytest_twisted.ensureDeferred
async def test_retention_deletes_oldest_first_and_tells_the_manager(
    cpvm_factory, manager, tmp_path
):
    directory = tmp_path / "recordings"
    directory.mkdir(mode=0o700)
    now = time.time()
    names = {}
    for label, age_days, size in (
        ("ancient", 60, 100),
        ("old", 3, 4000),
        ("mid", 2, 4000),
        ("new", 1, 4000),
    ):
        sid = str(uuid.uuid4())
        names[label] = sid
        path = directory / f"{sid}.fbs"
        path.write_bytes(b"\0" * size)
        os.utime(path, (now - age_days * 86400,) * 2)
    cpvm = cpvm_factory(recording={"directory": directory, "retention_days": 30, "max_bytes": 9000})
    await until(lambda: len(list(directory.iterdir())) == 2, "the retention")
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{names[k]}.fbs" for k in ("mid", "new")
    )
    log = cpvm.log_text()
    assert log.index(names["ancient"]) < log.index(names["old"])
    assert "recording deleted (age)" in log and "recording deleted (space)" in log
    await until(lambda: len(manager.recordings_deleted) == 2, "the heartbeat's deletions")
    assert manager.recordings_deleted == [names["ancient"], names["old"]]


@pytest_twisted.ensureDeferred
async def test_a_playback_url_works_once(cpvm_factory, manager, echo_vnc, tmp_path):
    import treq

    directory = tmp_path / "recordings"
    cpvm = cpvm_factory(recording={"directory": directory})
    token, issued = manager.issue({"host": "127.0.0.1", "port": echo_vnc}, recording=True)
    client = await open_console(ws_url(cpvm, token))
    await client.rfb_handshake()
    client.send(key_events(10))
    await client.read(80)
    client.sendClose(1000)
    await client.wait_closed()
    report = await until(lambda: end_report(manager, issued.session_id), "the end report")
    manager.playback_tickets["T" * 43] = issued.session_id
    url = f"http://127.0.0.1:{cpvm.port}/recording/data?ticket={'T' * 43}"
    first = await treq.get(url, persistent=False)
    body = await first.content()
    assert first.code == 200 and hashlib.sha256(body).hexdigest() == report["recording"]["sha256"]
    assert first.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    again = await treq.get(url, persistent=False)
    assert again.code == 409 and b"already used" in await again.content()
    assert manager.playback_requests[0]["ticket"] == "T" * 43
    page = await treq.get(f"http://127.0.0.1:{cpvm.port}/recording/play", persistent=False)
    assert page.code == 200 and b"player.js" in await page.content()
    assert b"'self'" in page.headers.getRawHeaders(b"content-security-policy")[0]


# -- the whole story in a browser -------------------------------------------------------

CANVAS_HASH = (
    "(sel) => { const c = document.querySelector(sel); const d = c.getContext('2d')"
    ".getImageData(0, 0, c.width, c.height).data; let h = 0;"
    " for (let i = 0; i < d.length; i += 4) { h = (h * 31 + d[i] * 7 + d[i+1] * 3 + d[i+2]) >>> 0; }"
    " return [c.width, c.height, h]; }"
)


def record_then_play(console_url: str, player_url: str, text: str, shots) -> dict:
    from playwright.sync_api import sync_playwright

    from tests.integration.test_browser import CONNECTED
    from tests.peers import launch_chromium

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(console_url)
            page.wait_for_function(CONNECTED, timeout=30_000)
            status = page.inner_text("#noVNC_status")
            canvas = page.locator("#noVNC_container canvas")
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + 200, box["y"] + 150)
            page.mouse.click(box["x"] + 200, box["y"] + 150)
            time.sleep(0.5)
            page.keyboard.type(text, delay=30)
            time.sleep(1.5)
            live = page.evaluate(CANVAS_HASH, "#noVNC_container canvas")
            page.screenshot(path=str(shots[0]))
            page.close()  # the browser leaves: the session ends, the recording is closed
            time.sleep(2.5)  # the end report goes out with the next heartbeat
            player = browser.new_page(viewport={"width": 1280, "height": 900})
            player.goto(player_url)
            player.wait_for_function(
                "() => document.body.dataset.state === 'ended'", timeout=60_000
            )
            time.sleep(0.5)
            played = player.evaluate(CANVAS_HASH, "#screen canvas")
            player.screenshot(path=str(shots[1]))
            return {
                "status": status,
                "live": live,
                "played": played,
                "name": player.inner_text("#name"),
            }
        finally:
            browser.close()


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_record_typing_in_chromium_and_play_it_back(cpvm_factory, manager, xvnc, tmp_path):
    from tests.integration.test_browser import console_url
    from tests.peers import XVNC_TEST_PASSWORD

    directory = tmp_path / "recordings"
    typed = tmp_path / "typed.txt"
    xterm = xvnc.run_xterm(command=("sh", "-c", f"cat > {typed}"))
    try:
        cpvm = cpvm_factory(recording={"directory": directory})
        token, issued = manager.issue(
            {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD},
            vm_name="xvnc-desktop",
            recording=True,
        )
        ticket = "P" * 43
        manager.playback_tickets[ticket] = issued.session_id
        player_url = f"http://127.0.0.1:{cpvm.port}/recording/play#ticket={ticket}"
        shots = (tmp_path / "live.png", tmp_path / "played.png")
        seen = await threads.deferToThread(
            record_then_play, console_url(cpvm, token), player_url, "recorded 42\n", shots
        )
    finally:
        xterm.terminate()
    assert MARKER + "xvnc-desktop" in seen["status"]
    assert typed.read_text() == "recorded 42\n"
    # The last frame played back is the frame the person last saw, typed text and all.
    assert seen["played"] == seen["live"], seen
    assert seen["name"] == MARKER + "xvnc-desktop"
    report = end_report(manager, issued.session_id)
    raw = (directory / f"{issued.session_id}.fbs").read_bytes()
    assert report["recording"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert report["recording"]["complete"] is True


@pytest_twisted.ensureDeferred
async def test_a_resumed_session_records_its_next_connection_beside_the_first(
    cpvm_factory, manager, echo_vnc, tmp_path
):
    directory = tmp_path / "recordings"
    cpvm = cpvm_factory(recording={"directory": directory})
    vnc = {"host": "127.0.0.1", "port": echo_vnc}
    token, first = manager.issue(vnc, recording=True)
    client = await open_console(ws_url(cpvm, token))
    await client.rfb_handshake()
    client.send(key_events(3))
    await client.read(24)
    client.transport.abortConnection()  # an unclean end: the browser may come back
    await until(lambda: end_report(manager, first.session_id), "the first end report")
    # The manager resumes the same session: its redemption says reconnects = 1.
    token, again = manager.issue(vnc, recording=True, console={"reconnects": 1})
    again.session_id = first.session_id
    client = await open_console(ws_url(cpvm, token))
    await client.rfb_handshake()
    client.send(key_events(5))
    assert await client.read(40)
    client.sendClose(1000)
    await client.wait_closed()
    sid = first.session_id
    await until(lambda: len([s for s, _ in manager.ends if s == sid]) == 2, "both end reports")
    names = sorted(p.name for p in directory.iterdir())
    assert names == [f"{sid}-r1.fbs", f"{sid}.fbs"]
    last = [r for s, r in manager.ends if s == sid][-1]
    raw = (directory / f"{sid}-r1.fbs").read_bytes()
    assert last["recording"]["sha256"] == hashlib.sha256(raw).hexdigest()
    assert last["recording"]["complete"] is True
