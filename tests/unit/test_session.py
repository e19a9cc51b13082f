"""ConsoleSession driven by hand: fake sides, a Clock, no sockets."""

from __future__ import annotations

import struct

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cpvm.common.contract import Outcome, ViewerPolicy
from cpvm.proxy.manager_client import ManagerUnavailable, Redemption, RedemptionRefused, VncTarget
from cpvm.proxy.session import MAX_PRE_RELAY_BUFFER, REFUSAL_GRACE, ConsoleSession, SessionLimits
from cpvm.rfb import ServerInit

SERVER_INIT = ServerInit(800, 600, bytes(16), b"qemu")
REDEMPTION = Redemption(
    session_id="s-1",
    vm_id="vm-1",
    vm_name="web-01",
    account="alice",
    vnc=VncTarget("127.0.0.1", 5901, b"pw", "none", None, None),
    idle_timeout=None,
    max_duration=None,
)


class FakeBrowser:
    def __init__(self):
        self.transport = StringTransport()
        self.sent = b""
        self.closed = None

    def send(self, data):
        self.sent += data

    def close(self, code, reason):
        self.closed = (code, reason)


class FakeUpstream:
    def __init__(self):
        self.transport = StringTransport()
        self.written = b""
        self.client_init = None
        self.closed = False

    def write(self, data):
        self.written += data

    def send_client_init(self, shared):
        self.client_init = shared

    def close(self):
        self.closed = True


class Hooks:
    def __init__(self):
        self.events = []

    def redeemed(self, s):
        self.events.append("redeemed")

    def relay_started(self, s):
        self.events.append("relay")

    def redeemed_after_close(self, s):
        self.events.append(("late", s.session_id, s.outcome))

    def ended(self, s, outcome, detail):
        self.events.append(outcome)


def make(redeem_result=None, limits=None):
    clock = Clock()
    browser = FakeBrowser()
    upstream = FakeUpstream()
    hooks = Hooks()
    redeem_d = Deferred() if redeem_result is None else redeem_result
    calls = {}

    def redeem(token, extra, client):
        calls["redeem"] = (token, extra, client)
        return redeem_d

    def connect(session, redemption):
        calls["connect"] = redemption
        session.upstream_connected(upstream)
        return succeed(None)

    session = ConsoleSession(
        reactor=clock,
        browser=browser,
        token="tok",
        extra=None,
        client_address="192.0.2.7",
        redeem=redeem,
        connect_upstream=connect,
        limits=limits or SessionLimits(handshake_timeout=10, idle_timeout=60, max_duration=3600),
        hooks=hooks,
    )
    return session, clock, browser, upstream, hooks, calls, redeem_d


def to_relay(session, browser, upstream, redeem_d):
    session.start()
    redeem_d.callback(REDEMPTION)
    session.browser_data(b"RFB 003.008\n")
    session.upstream_security_complete()
    session.browser_data(b"\x01")  # security None
    session.browser_data(b"\x01")  # ClientInit, shared
    session.upstream_server_init(SERVER_INIT, b"")


def test_happy_path_order_and_relay():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    assert browser.sent == b"RFB 003.008\n"
    assert calls["redeem"] == ("tok", None, "192.0.2.7")
    session.browser_data(b"RFB 003.008\n")
    # Nothing is offered to the browser before the VNC server accepted us.
    assert browser.sent == b"RFB 003.008\n"
    redeem_d.callback(REDEMPTION)
    assert calls["connect"] is REDEMPTION
    session.upstream_security_complete()
    assert browser.sent.endswith(b"\x01\x01")
    session.browser_data(b"\x01")
    assert browser.sent.endswith(b"\x00\x00\x00\x00")
    session.browser_data(b"\x01" + b"\x03\x00" + struct.pack("!HHHH", 0, 0, 8, 8))
    assert upstream.client_init is True
    assert upstream.written == b"\x03\x00" + struct.pack("!HHHH", 0, 0, 8, 8)
    session.upstream_server_init(SERVER_INIT, b"\x00\x00\x00\x00")
    assert SERVER_INIT.with_name(b"web-01").to_bytes() in browser.sent
    assert browser.sent.endswith(b"\x00\x00\x00\x00")
    assert hooks.events == ["redeemed", "relay"]
    session.upstream_data(b"frame")
    session.browser_data(b"\x04\x01\x00\x00\x00\x00\x00\x61")
    assert browser.sent.endswith(b"frame")
    assert upstream.written.endswith(b"\x04\x01\x00\x00\x00\x00\x00\x61")
    assert session.stats.bytes_to_client == 4 + 5
    # Both transports are each other's producers.
    assert browser.transport.producer is upstream.transport
    assert upstream.transport.producer is browser.transport


@pytest.mark.parametrize(
    "error, outcome",
    [("token_used", Outcome.TOKEN_USED), ("extra_mismatch", Outcome.EXTRA_MISMATCH)],
)
def test_refusal_after_version_is_told_through_rfb(error, outcome):
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    session.browser_data(b"RFB 003.008\n")
    redeem_d.errback(RedemptionRefused(outcome, error, "x"))
    reason = outcome.text.encode()
    assert browser.sent.endswith(b"\x00" + struct.pack("!I", len(reason)) + reason)
    assert browser.closed == (outcome.code, outcome.text)
    assert "connect" not in calls


def test_refusal_before_version_waits_then_closes():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    redeem_d.errback(ManagerUnavailable("down"))
    assert browser.closed is None
    clock.advance(REFUSAL_GRACE + 0.1)
    assert browser.closed == (4010, "management server unreachable")


def test_refusal_before_version_uses_rfb_when_the_version_comes():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    redeem_d.errback(ManagerUnavailable("down"))
    session.browser_data(b"RFB 003.008\n")
    assert b"management server unreachable" in browser.sent
    assert browser.closed[0] == 4010
    clock.advance(REFUSAL_GRACE + 1)  # the grace timer was cancelled with the close
    assert hooks.events.count(Outcome.MANAGER_UNREACHABLE) == 1


def test_handshake_timeout_while_redeeming_and_while_connecting():
    session, clock, browser, *_, redeem_d = make()
    session.start()
    session.browser_data(b"RFB 003.008\n")
    clock.advance(10)
    assert browser.closed[0] == 4010
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    session.browser_data(b"RFB 003.008\n")
    redeem_d.callback(REDEMPTION)
    clock.advance(10)
    assert browser.closed[0] == 4014
    assert upstream.closed


def test_idle_timeout_ignores_automatic_traffic():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    to_relay(session, browser, upstream, redeem_d)
    fbur = b"\x03\x01" + struct.pack("!HHHH", 0, 0, 800, 600)
    for _ in range(5):
        clock.advance(20)
        session.browser_data(fbur)
    assert browser.closed == (4020, "idle timeout (no input from the browser)")


def test_key_and_pointer_events_are_activity():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    to_relay(session, browser, upstream, redeem_d)
    for _ in range(10):
        clock.advance(50)
        session.browser_data(b"\x05\x00\x00\x10\x00\x10")  # PointerEvent
    assert browser.closed is None
    clock.advance(61)
    assert browser.closed[0] == 4020


def test_manager_limit_is_applied_when_stricter():
    r = Redemption(**{**REDEMPTION.__dict__, "max_duration": 30.0})
    session, clock, browser, upstream, hooks, calls, _ = make(redeem_result=succeed(r))
    session.start()
    clock.advance(29)
    assert browser.closed is None
    clock.advance(2)
    assert browser.closed == (4021, "session time limit reached")


def test_browser_flood_before_relay_is_refused():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    redeem_d.callback(REDEMPTION)
    session.browser_data(b"RFB 003.008\n")
    session.upstream_security_complete()
    session.browser_data(b"\x01\x01")
    session.browser_data(b"\x00" * (MAX_PRE_RELAY_BUFFER + 1))
    assert browser.closed[0] == 4015


def test_close_is_idempotent_and_reports_once():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    to_relay(session, browser, upstream, redeem_d)
    session.upstream_lost("ConnectionDone")
    session.browser_closed(1000)
    session.terminate(Outcome.TERMINATED, "late")
    assert hooks.events == ["redeemed", "relay", Outcome.SERVER_CLOSED]
    assert browser.closed == (1000, "session ended (VNC server closed)")


def test_unexpected_error_is_an_internal_error_close():
    session, clock, browser, upstream, hooks, calls, _ = make(
        redeem_result=fail(RuntimeError("bug"))
    )
    session.start()
    assert hooks.events == [Outcome.ERROR]
    assert browser.closed == (1011, "internal error")


def test_failure_after_none_was_offered_closes_with_the_code():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    redeem_d.callback(REDEMPTION)
    session.browser_data(b"RFB 003.008\n")
    session.upstream_security_complete()
    session.browser_data(b"\x01")
    session.upstream_lost("ConnectionLost")  # before ServerInit
    assert browser.closed == (4013, "VNC protocol error")
    assert hooks.events[-1] == Outcome.VNC_PROTOCOL_ERROR


def test_redemption_that_lands_after_the_end_is_reported():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    session.browser_closed(1001)
    redeem_d.callback(REDEMPTION)
    assert hooks.events == [Outcome.CLIENT_CLOSED, ("late", "s-1", Outcome.CLIENT_CLOSED)]
    assert "connect" not in calls


def test_flood_before_the_version_decision_is_bounded():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    session.browser_data(b"RFB 003.008\n")
    for _ in range(100):
        session.browser_data(b"\x00" * 1024)
        if browser.closed:
            break
    assert browser.closed[0] == 4015


def test_protocol_violations_reported_by_autobahn():
    session, clock, browser, upstream, hooks, calls, redeem_d = make()
    session.start()
    session.browser_closed(1009)
    assert hooks.events == [Outcome.CLIENT_PROTOCOL_ERROR]


def test_manager_idle_limit_applies_when_ours_is_off():
    r = Redemption(**{**REDEMPTION.__dict__, "idle_timeout": 30.0})
    session, clock, browser, upstream, hooks, calls, _ = make(
        redeem_result=succeed(r),
        limits=SessionLimits(handshake_timeout=10, idle_timeout=0, max_duration=0),
    )
    session.start()
    session.browser_data(b"RFB 003.008\n")
    session.upstream_security_complete()
    session.browser_data(b"\x01\x01")
    session.upstream_server_init(SERVER_INIT, b"")
    clock.advance(31)
    assert browser.closed[0] == 4020


# -- view-only consoles and the viewer policy ---------------------------------------------

VIEW_ONLY = Redemption(**{**REDEMPTION.__dict__, "view_only": True})
FBUR = b"\x03\x01" + struct.pack("!HHHH", 0, 0, 800, 600)
KEY = b"\x04\x01\x00\x00\x00\x00\x00\x61"


def _open(redemption, client_init=b"\x01", leftover=b""):
    session, clock, browser, upstream, hooks, calls, _ = make(redeem_result=succeed(redemption))
    session.start()
    session.browser_data(b"RFB 003.008\n")
    session.upstream_security_complete()
    session.browser_data(b"\x01")
    session.browser_data(client_init + leftover)  # ClientInit and what came with it
    return session, clock, browser, upstream, hooks


def test_view_only_filters_before_and_after_server_init():
    # Bytes behind the ClientInit reach the server before ServerInit: filtered too.
    session, clock, browser, upstream, hooks = _open(VIEW_ONLY, leftover=KEY + FBUR)
    assert upstream.written == FBUR
    session.upstream_server_init(SERVER_INIT, b"")
    session.browser_data(KEY + FBUR + KEY[:3])
    session.browser_data(KEY[3:] + FBUR)
    assert upstream.written == FBUR * 3
    assert session.stats.bytes_to_server == len(FBUR) * 3  # what the server got
    # A watcher's keys keep the session from idling out all the same.
    for _ in range(5):
        clock.advance(50)
        session.browser_data(KEY)
    assert browser.closed is None


def test_view_only_fails_closed_on_an_unsizable_message():
    session, clock, browser, upstream, hooks = _open(VIEW_ONLY)
    session.upstream_server_init(SERVER_INIT, b"")
    session.browser_data(FBUR + b"\x07\x00\x00\x00" + FBUR)
    assert upstream.written == FBUR and upstream.closed
    assert browser.closed == (
        4017,
        "view-only console: the browser sent a message cpvm cannot check",
    )
    assert hooks.events[-1] is Outcome.VIEW_ONLY_UNCHECKABLE


def test_a_full_console_is_not_filtered():
    session, clock, browser, upstream, hooks = _open(REDEMPTION)
    session.upstream_server_init(SERVER_INIT, b"")
    session.browser_data(KEY + b"\x07anything")
    assert upstream.written == KEY + b"\x07anything"


@pytest.mark.parametrize(
    "view_only, policy, browser_flag, sent",
    [
        (False, ViewerPolicy.SHARED, b"\x01", True),
        (False, ViewerPolicy.SHARED, b"\x00", False),  # the browser's wish, as before
        (True, ViewerPolicy.SHARED, b"\x00", True),  # a watcher never drops anyone
        (False, ViewerPolicy.EXCLUSIVE, b"\x00", True),
        (False, ViewerPolicy.TAKEOVER, b"\x00", True),
    ],
)
def test_the_vnc_shared_flag_follows_the_viewer_policy(view_only, policy, browser_flag, sent):
    r = Redemption(**{**REDEMPTION.__dict__, "view_only": view_only, "viewer_policy": policy})
    _, _, _, upstream, _ = _open(r, client_init=browser_flag)
    assert upstream.client_init is sent
