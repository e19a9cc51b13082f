"""Refusals told after the upgrade (RFB's failure reason) and the log line for a refused
Origin (cpvm/proxy/refusal.py)."""

from __future__ import annotations

import struct

import pytest

from cpvm.common.contract import Outcome
from cpvm.proxy.refusal import ToldRefusal, origin_refusal_detail, printable


def reason_message(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!I", len(raw)) + raw


@pytest.mark.parametrize(
    ("version", "head"),
    [(b"RFB 003.008\n", b"\x00"), (b"RFB 003.007\n", b"\x00"), (b"RFB 003.003\n", b"\0\0\0\0")],
)
def test_the_reason_follows_the_browsers_version(version, head):
    told = ToldRefusal(Outcome.AT_CAPACITY)
    assert told.start() == b"RFB 003.008\n"
    assert told.receive(version[:5]) == (b"", False)
    reply, finished = told.receive(version[5:])
    assert finished and reply == head + reason_message(Outcome.AT_CAPACITY.text)
    assert told.receive(b"more") == (b"", True)


def test_a_client_that_is_not_rfb_gets_only_the_close():
    told = ToldRefusal(Outcome.BAD_REQUEST)
    told.start()
    assert told.receive(b"GET / HTTP/1.1\r\n") == (b"", True)


def test_origin_detail_names_the_origin_and_the_setting():
    detail = origin_refusal_detail(
        "https://dash.example", "cpvm.example:8443", "https", ("self", "https://other.example")
    )
    assert detail == (
        "origin 'https://dash.example' is not allowed: to let that page open consoles, add it"
        " to [server] allowed_origins in cpvm.conf (now: self, https://other.example)"
    )


def test_origin_detail_explains_a_tls_proxy_in_front():
    detail = origin_refusal_detail("https://cpvm.example", "cpvm.example", "http", ("self",))
    assert "the page is https:// but cpvm's listener is http://" in detail


def test_a_hostile_origin_stays_one_short_line():
    detail = origin_refusal_detail(
        "https://x\n2026 forged line\x1b[2J" + "a" * 500, None, "http", ()
    )
    assert "\n" not in detail and "\x1b" not in detail and len(detail) < 400
    assert printable("a\tb") == "a?b"
    # Not even a URL: still a line, no exception in the refusal path.
    assert origin_refusal_detail("https://[", "h", "http", ("self",)).startswith(
        "origin 'https://['"
    )


# -- the shell: which refusals are told, and how many at once -----------------------------


class _Sessions:
    def __init__(self, full: bool = False, accepting: bool = True):
        self.full, self.accepting, self.refusals = full, accepting, []

    def at_capacity(self):
        return self.full

    def too_many_pending(self):
        return False

    def refused(self, reason):
        self.refusals.append(reason)


def _protocol(sessions, told_already: int = 0):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from cpvm.proxy.websocket import ConsoleWebSocketFactory

    factory = ConsoleWebSocketFactory(
        sessions=sessions,
        scheme="http",
        allowed_origins=("self",),
        trusted_proxies=(),
        open_handshake_timeout=5,
        max_message_size=65536,
        server_name="cpvm",
        reactor=Clock(),
    )
    factory.told_refusals = told_already
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    return factory, proto


class _Request:
    def __init__(self, params, origin=None):
        self.path = "/websockify"
        self.params = params
        self.protocols = ["binary"]
        self.headers = {"host": "cpvm.example"} | ({"origin": origin} if origin else {})


@pytest.mark.parametrize(
    ("sessions", "params", "outcome"),
    [
        (_Sessions(), {}, Outcome.BAD_REQUEST),
        (_Sessions(full=True), {"token": ["t"]}, Outcome.AT_CAPACITY),
    ],
)
def test_told_refusals_are_accepted_upgrades_up_to_the_bound(sessions, params, outcome):
    from autobahn.websocket.types import ConnectionDeny

    from cpvm.proxy.refusal import MAX_TOLD_AT_ONCE

    factory, proto = _protocol(sessions)
    assert proto.onConnect(_Request(params)) == "binary"  # upgraded, to be told
    assert proto._told.outcome is outcome and factory.told_refusals == 1
    proto.onClose(False, 1006, None)
    assert factory.told_refusals == 0
    # At the bound: the HTTP status again, nothing held open.
    factory, proto = _protocol(sessions, told_already=MAX_TOLD_AT_ONCE)
    with pytest.raises(ConnectionDeny):
        proto.onConnect(_Request(params))
    assert factory.told_refusals == MAX_TOLD_AT_ONCE


def test_origin_and_shutdown_are_never_told():
    from autobahn.websocket.types import ConnectionDeny

    _, proto = _protocol(_Sessions())
    with pytest.raises(ConnectionDeny) as denied:
        proto.onConnect(_Request({"token": ["t"]}, origin="https://evil.example"))
    assert denied.value.code == 403
    _, proto = _protocol(_Sessions(full=True, accepting=False))
    with pytest.raises(ConnectionDeny) as denied:
        proto.onConnect(_Request({"token": ["t"]}))
    assert denied.value.code == 503
