"""A WebSocket RFB client for tests: what noVNC does, minus the browser.

Runs in the test's reactor (pytest-twisted). It reads with a bound on every wait so a
broken proxy fails a test instead of hanging it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.ssl import optionsForClientTLS


@dataclass
class Closed:
    code: int | None
    reason: str | None
    was_clean: bool


class RfbWebSocketClient(WebSocketClientProtocol):
    """Collects binary messages into a byte buffer; exposes bounded reads."""

    def __init__(self):
        super().__init__()
        self.buffer = bytearray()
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.close_info: Closed | None = None
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self.text_frames = 0
        self.pause_reading = False

    def onOpen(self):  # noqa: N802
        self.opened.callback(self)

    def onMessage(self, payload, isBinary):  # noqa: N802
        if not isBinary:
            self.text_frames += 1
            return
        self.buffer += payload
        self._wake()

    def onClose(self, wasClean, code, reason):  # noqa: N802
        self.close_info = Closed(code, reason, wasClean)
        if not self.opened.called:
            self.opened.errback(ConnectionError(f"WebSocket refused: {code} {reason}"))
        self.closed.callback(self.close_info)
        for _, d in self._waiters:
            d.errback(ConnectionError(f"closed {code} {reason}"))
        self._waiters.clear()

    def _wake(self):
        while self._waiters and len(self.buffer) >= self._waiters[0][0]:
            n, d = self._waiters.pop(0)
            data = bytes(self.buffer[:n])
            del self.buffer[:n]
            d.callback(data)

    def read(self, n: int, timeout: float = 10) -> defer.Deferred:
        """Fires with exactly ``n`` bytes, or fails on close or timeout."""
        if self.close_info is not None and len(self.buffer) < n:
            return defer.fail(ConnectionError(f"closed {self.close_info}"))
        d = defer.Deferred()
        self._waiters.append((n, d))
        d.addTimeout(timeout, reactor)
        self._wake()
        return d

    def send(self, data: bytes) -> None:
        self.sendMessage(data, isBinary=True)

    async def rfb_handshake(self, shared: bool = True) -> dict:
        """Do noVNC's side of the handshake through a cpvm: version 3.8, security None."""
        version = await self.read(12)
        assert version == b"RFB 003.008\n", version
        self.send(b"RFB 003.008\n")
        (count,) = struct.unpack("B", await self.read(1))
        if count == 0:
            (length,) = struct.unpack("!I", await self.read(4))
            reason = (await self.read(length)).decode()
            raise RfbRefused(reason)
        types = await self.read(count)
        assert types == b"\x01", types
        self.send(b"\x01")
        result = await self.read(4)
        assert result == b"\x00\x00\x00\x00", result
        self.send(b"\x01" if shared else b"\x00")
        head = await self.read(24)
        width, height = struct.unpack("!HH", head[:4])
        (name_len,) = struct.unpack("!I", head[20:24])
        name = await self.read(name_len)
        return {"width": width, "height": height, "pixel_format": head[4:20], "name": name}

    async def wait_closed(self, timeout: float = 15) -> Closed:
        d = defer.Deferred()
        self.closed.addBoth(lambda r: (d.callback(r) if not d.called else None, r)[1])
        d.addTimeout(timeout, reactor)
        return await d


class RfbRefused(Exception):
    """cpvm refused the session with an RFB security failure reason."""


async def open_console(
    url: str,
    origin: str | None = None,
    protocols=("binary",),
    headers: dict | None = None,
    ca_pem: bytes | None = None,
    timeout: float = 10,
) -> RfbWebSocketClient:
    """Open a WebSocket like noVNC does; ``url`` is ws://host:port/websockify?token=…"""
    factory = WebSocketClientFactory(
        url, origin=origin, protocols=list(protocols) or None, headers=headers or {}
    )
    factory.protocol = RfbWebSocketClient
    factory.setProtocolOptions(
        maxFramePayloadSize=0, maxMessagePayloadSize=0, openHandshakeTimeout=timeout
    )
    host, port = factory.host, factory.port
    if factory.isSecure:
        from twisted.internet import ssl

        trust = ssl.Certificate.loadPEM(ca_pem) if ca_pem else None
        endpoint = clientFromString(reactor, f"tcp:{host}:{port}")
        from twisted.internet.endpoints import wrapClientTLS

        endpoint = wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), endpoint)
    else:
        endpoint = clientFromString(reactor, f"tcp:{host}:{port}:timeout={int(timeout)}")
    proto = await connectProtocol(endpoint, factory.buildProtocol(None))
    opened = proto.opened
    opened.addTimeout(timeout, reactor)
    await opened
    return proto
