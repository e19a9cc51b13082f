"""The recording player in headless Chromium: stock noVNC draws an FBS file served by the
player resource, under cpvm's own security headers; play, seek back, the one-time download.

The recording here is made by cpvm's own recorder from a hand-built RFB stream (two Raw
updates in noVNC's pixel format), so what the last frame must show is known exactly.
"""

from __future__ import annotations

import struct

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import fail, succeed

from cpvm.common.httplimits import HttpLimits
from cpvm.proxy.headers import SecurityHeaders
from cpvm.proxy.recording.player import PlaybackRefused, build_player
from cpvm.proxy.recording.recorder import RecordingSettings, SessionRecorder
from cpvm.proxy.recording.writer import InlineDrain
from cpvm.proxy.web import ConsoleSite, build_root
from cpvm.rfb import ServerInit
from tests.peers import launch_chromium

pytestmark = pytest.mark.browser

SESSION = "0b7e1c2a-1111-4222-8333-444455556666"
# noVNC asks for 32 bpp, depth 24, little endian, true colour, red at bit 0.
NOVNC_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0])
W, H = 64, 48


def raw_update(x, y, w, h, rgb) -> bytes:
    pixel = bytes([*rgb, 0])
    return struct.pack(">BxHHHHHi", 0, 1, x, y, w, h, 0) + pixel * (w * h)


def make_recording(directory) -> None:
    rec = SessionRecorder(
        settings=RecordingSettings(str(directory)),
        session_id=SESSION,
        drain=InlineDrain(),
        call_from_thread=lambda fn, *a: fn(*a),
        on_failure=lambda reason: pytest.fail(reason),
    )
    rec.start(ServerInit(W, H, NOVNC_FORMAT, "\u25cf REC player-test".encode()), 0.0)
    rec.server_data(raw_update(0, 0, W, H, (255, 0, 0)), 0.2)  # all red
    rec.server_data(raw_update(0, 0, W // 2, H, (0, 255, 0)), 1.5)  # left half green
    rec.finish(2.0)


def serve(directory, tickets):
    def redeem(ticket):
        if tickets.pop(ticket, None) is None:
            return fail(PlaybackRefused(404, "this playback link was already used or is unknown"))
        return succeed(SESSION)

    root = build_root(
        novnc_dir="/usr/share/novnc", websocket_factory=None, readiness=lambda: (True, "")
    )
    root.putChild(b"recording", build_player(directory=str(directory), redeem=redeem))
    site = ConsoleSite(
        root,
        limits=HttpLimits(
            max_body=0, request_deadline=10, max_connections=50, max_connections_per_address=50
        ),
        security_headers=SecurityHeaders(tls=False, frame_ancestors="'self'"),
    )
    return reactor.listenTCP(0, site, interface="127.0.0.1")


PIXEL = "([x, y]) => Array.from(document.querySelector('#screen canvas').getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3))"


def play(base: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.add_init_script(
                "window.__violations = [];"
                "document.addEventListener('securitypolicyviolation', e =>"
                " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            page.goto(f"{base}/recording/play#ticket=t-1")
            page.wait_for_function("() => document.body.dataset.state === 'ended'", timeout=30_000)
            out = {
                "url": page.url,
                "name": page.inner_text("#name"),
                "time": page.inner_text("#time"),
                "end_left": page.evaluate(PIXEL, [10, 10]),
                "end_right": page.evaluate(PIXEL, [50, 10]),
            }
            page.evaluate("() => window.cpvmPlayer.seek(1000)")
            page.wait_for_function("() => window.cpvmPlayer.position === 1000")
            page.wait_for_timeout(300)
            out["at_1s_left"] = page.evaluate(PIXEL, [10, 10])
            # Pause holds the position; speed changes how fast it plays.
            page.select_option("#speed", "0.5")
            page.evaluate("() => window.cpvmPlayer.seek(0)")
            page.click("#play")
            page.wait_for_timeout(400)
            page.click("#play")  # now "Pause"
            held = page.evaluate("() => window.cpvmPlayer.position")
            page.wait_for_timeout(500)
            out["paused"] = (held, page.evaluate("() => window.cpvmPlayer.position"))
            out["paused_state"] = page.inner_text("#status")
            page.select_option("#speed", "8")
            page.click("#play")
            started = page.evaluate("() => performance.now()")
            page.wait_for_function("() => document.body.dataset.state === 'ended'")
            out["fast_ms"] = page.evaluate("() => performance.now()") - started
            out["fast_left"] = page.evaluate(PIXEL, [10, 10])
            out["violations"] = page.evaluate("() => window.__violations")
            # The same link again: the download was one-time.
            again = browser.new_page()
            again.goto(f"{base}/recording/play#ticket=t-1")
            again.wait_for_function(
                "() => document.body.dataset.state === 'failed'", timeout=30_000
            )
            out["again"] = again.inner_text("#status")
            return out
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_the_player_replays_a_recording_once(tmp_path):
    make_recording(tmp_path)
    tickets = {"t-1": True}
    port = serve(tmp_path, tickets)
    try:
        base = f"http://127.0.0.1:{port.getHost().port}"
        seen = await threads.deferToThread(play, base)
    finally:
        await port.stopListening()
    assert seen["end_left"] == [0, 255, 0] and seen["end_right"] == [255, 0, 0]
    assert seen["at_1s_left"] == [255, 0, 0]  # seeking back replays from the start
    assert seen["name"] == "\u25cf REC player-test"
    assert seen["time"] == "0:01 / 0:01"
    assert "ticket" not in seen["url"]  # taken off the address bar
    held, later = seen["paused"]
    assert 0 < held < 1500 and later == held and seen["paused_state"] == "paused"
    assert seen["fast_ms"] < 1000 and seen["fast_left"] == [0, 255, 0]  # 8×: ~160 ms
    assert seen["violations"] == []
    assert "already used" in seen["again"]


def test_download_refuses_without_exactly_one_ticket(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    player = build_player(directory=str(tmp_path), redeem=lambda t: pytest.fail("redeemed"))
    for args in ({}, {b"ticket": [b"a", b"b"]}, {b"ticket": [b""]}):
        request = DummyRequest([b""])
        request.args = args
        body = player.getChildWithDefault(b"data", request).render(request)
        assert request.responseCode == 400 and b"ticket" in body


def test_download_of_a_deleted_recording_is_410(tmp_path):
    from twisted.web.test.requesthelper import DummyRequest

    player = build_player(directory=str(tmp_path), redeem=lambda t: succeed(SESSION))
    request = DummyRequest([b""])
    request.args = {b"ticket": [b"t"]}
    player.getChildWithDefault(b"data", request).render(request)
    assert request.responseCode == 410 and b"no longer kept" in b"".join(request.written)
