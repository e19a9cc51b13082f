"""The channel-level HTTP limits (cpvm.common.httplimits) driven through StringTransport + Clock."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from cpvm.common.httplimits import ConnectionCounter, HttpLimits, LimitedSite


class Echo(Resource):
    isLeaf = True

    def render(self, request):
        return b"got %d bytes" % len(request.content.read())


def make_site(clock, **limits):
    values = {"max_body": 0, "request_deadline": 10.0, **limits}
    return LimitedSite(Echo(), limits=HttpLimits(**values), reactor=clock)


def connect(site, host="192.0.2.7"):
    address = IPv4Address("TCP", host, 40000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    return channel, transport


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_no_body_site_refuses_content_length_from_the_headers():
    site = make_site(Clock())
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert transport.disconnecting
    # What follows is dropped, never stored or answered.
    channel.dataReceived(b"x" * 100_000)
    assert transport.value().count(b"HTTP/1.1") == 1


def test_no_body_site_refuses_chunked_from_the_headers():
    site = make_site(Clock())
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"got" not in transport.value()


def test_no_body_site_serves_requests_without_body():
    site = make_site(Clock())
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert transport.value().endswith(b"got 0 bytes")


def test_capped_site_accepts_bodies_up_to_the_cap_in_memory():
    site = make_site(Clock(), max_body=10)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    assert transport.value().endswith(b"got 10 bytes")
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")


def test_capped_site_counts_chunked_bodies_and_stops_at_the_cap():
    site = make_site(Clock(), max_body=10)
    channel, transport = connect(site)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"6\r\nabcdef\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"6\r\nghijkl\r\n6\r\nmnopqr\r\n0\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert b"got" not in transport.value()
    # Within the cap, chunked works.
    channel, transport = connect(site)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
    )
    assert transport.value().endswith(b"got 4 bytes")


def test_deadline_is_absolute_from_accept_whatever_trickles_in():
    clock = Clock()
    site = make_site(clock, request_deadline=10.0)
    channel, transport = connect(site)
    trickle = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    for byte in trickle:  # one byte every 0.3 s, never the end of the headers
        channel.dataReceived(bytes([byte]))
        clock.advance(0.3)
        if transport.disconnecting:
            break
    assert clock.seconds() == pytest.approx(10.2)  # 34 bytes: stopped at the deadline
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_deadline_restarts_for_the_next_request_on_a_kept_alive_connection():
    clock = Clock()
    site = make_site(clock, request_deadline=10.0)
    channel, transport = connect(site)
    clock.advance(9)
    channel.dataReceived(GET)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(9)  # 18 s after accept, 9 after the answer: still open
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    # Idle between requests: closed without an answer nobody asked for.
    assert transport.value().count(b"HTTP/1.1") == 1 and b"408" not in transport.value()


def test_a_request_begun_on_a_kept_alive_connection_gets_408_at_its_deadline():
    clock = Clock()
    site = make_site(clock, request_deadline=10.0)
    channel, transport = connect(site)
    channel.dataReceived(GET)
    clock.advance(5)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    clock.advance(5.5)
    assert transport.disconnecting
    assert transport.value().split(b"got 0 bytes", 1)[1].startswith(b"HTTP/1.1 408 ")


def test_a_silent_connection_is_closed_at_the_deadline_without_answer():
    clock = Clock()
    site = make_site(clock, request_deadline=10.0)
    channel, transport = connect(site)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b""


def test_connection_caps_total_and_per_address():
    clock = Clock()
    site = make_site(clock, max_connections=3, max_connections_per_address=2)
    a1, ta1 = connect(site, "192.0.2.1")
    a2, ta2 = connect(site, "192.0.2.1")
    a3, ta3 = connect(site, "192.0.2.1")
    assert not ta1.disconnecting and not ta2.disconnecting
    assert ta3.disconnected  # aborted at once: the per-address cap
    b1, tb1 = connect(site, "192.0.2.2")
    assert not tb1.disconnected
    c1, tc1 = connect(site, "192.0.2.3")
    assert tc1.disconnected  # the total cap
    # A connection that ends frees its slot.
    a1.connectionLost(None)
    c2, tc2 = connect(site, "192.0.2.3")
    assert not tc2.disconnected


def test_upgrade_frees_the_slot_and_stops_the_deadline():
    clock = Clock()
    site = make_site(clock, max_connections_per_address=1)
    channel, transport = connect(site)
    channel.transport = None  # what Autobahn's WebSocketResource does on upgrade
    assert site.connections.held("192.0.2.7") == 0
    clock.advance(60)
    assert not transport.disconnecting
    other, t2 = connect(site)
    assert not t2.disconnected


def test_refusals_are_logged_once_per_interval():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock = Clock()
        site = make_site(clock, max_connections_per_address=1)
        connect(site)
        for _ in range(50):
            connect(site)
        clock.advance(11)
        connect(site)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("why") == "per-address connection limit reached"]
    assert [e["count"] for e in lines] == [1, 50]


def test_connection_counter_exempts_networks_from_the_per_address_cap():
    counter = ConnectionCounter(0, 1, (ipaddress.ip_network("10.0.0.0/8"),))
    assert counter.admit("10.1.1.1") is None
    assert counter.admit("10.1.1.1") is None
    assert counter.admit("192.0.2.1") is None
    assert counter.admit("192.0.2.1") == "per-address connection limit reached"
    counter.release("192.0.2.1")
    assert counter.admit("192.0.2.1") is None
    assert counter.total == 3
