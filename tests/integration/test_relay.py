"""The cuttable TCP relay (tests/relay.py) the reconnect tests put under the browser."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.task import deferLater

from tests.peers import HOST
from tests.relay import CuttableRelay


class _Echo(protocol.Protocol):
    def dataReceived(self, data):  # noqa: N802
        self.transport.write(data)


class _Client(protocol.Protocol):
    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()
        self.reason = None

    def dataReceived(self, data):  # noqa: N802
        self.received += data

    def connectionLost(self, reason):  # noqa: N802
        self.reason = reason
        self.lost.callback(None)


async def _until(check, seconds=5.0):
    for _ in range(int(seconds / 0.02)):
        if check():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("condition not reached in time")


@pytest_twisted.ensureDeferred
async def test_cut_aborts_live_connections_and_new_ones_still_pass():
    server = await TCP4ServerEndpoint(reactor, 0, interface=HOST).listen(
        protocol.Factory.forProtocol(_Echo)
    )
    relay = CuttableRelay(HOST, server.getHost().port)
    try:
        first = _Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, HOST, relay.port), first)
        first.transport.write(b"ping")
        await _until(lambda: first.received == b"ping")
        assert relay.live == 1
        assert relay.cut() == 1
        await first.lost
        # A reset, not an orderly close: what a dead network path looks like.
        assert first.reason.check(error.ConnectionLost) and not first.reason.check(
            error.ConnectionDone
        )
        await _until(lambda: relay.live == 0)
        second = _Client()
        await connectProtocol(TCP4ClientEndpoint(reactor, HOST, relay.port), second)
        second.transport.write(b"again")
        await _until(lambda: second.received == b"again")
        assert relay.accepted == 2
        second.transport.loseConnection()
        await second.lost
    finally:
        await relay.stop()
        await server.stopListening()
