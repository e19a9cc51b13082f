"""Tiny scripted VNC servers for fault and transparency tests (in the test reactor).

Real QEMU and TigerVNC prove the handshakes; these prove what real servers can't be made
to do on demand: echo bytes for checksums, hang, or talk nonsense.
"""

from __future__ import annotations

import struct

from twisted.internet import protocol, reactor

SERVER_INIT = struct.pack("!HH16sI", 64, 48, bytes(16), 4) + b"echo"


class EchoRfb(protocol.Protocol):
    """RFB 3.8, security None, then echoes every byte after ClientInit."""

    echo = True

    def connectionMade(self):  # noqa: N802
        self.factory.connections.append(self)
        self.buf = b""
        self.stage = "version"
        self.received = 0
        self.transport.write(b"RFB 003.008\n")

    def dataReceived(self, data):  # noqa: N802
        if self.stage == "relay":
            self.received += len(data)
            if self.echo:
                self.transport.write(data)
            return
        self.buf += data
        if self.stage == "version" and len(self.buf) >= 12:
            self.buf = self.buf[12:]
            self.transport.write(b"\x01\x01")
            self.stage = "security"
        if self.stage == "security" and len(self.buf) >= 1:
            self.buf = self.buf[1:]
            self.transport.write(b"\x00\x00\x00\x00")
            self.stage = "init"
        if self.stage == "init" and len(self.buf) >= 1:
            rest, self.buf = self.buf[1:], b""
            self.transport.write(SERVER_INIT)
            self.stage = "relay"
            if rest:
                self.dataReceived(rest)


class SinkRfb(EchoRfb):
    """Like ``EchoRfb``, but only counts what it receives after ClientInit."""

    echo = False


class Hanging(protocol.Protocol):
    """Accepts the connection and never says anything."""

    def connectionMade(self):  # noqa: N802
        self.factory.connections.append(self)


class Garbage(protocol.Protocol):
    """Not a VNC server at all."""

    def connectionMade(self):  # noqa: N802
        self.factory.connections.append(self)
        self.transport.write(b"SSH-2.0-OpenSSH_9.2\r\n")


def listen(proto_class) -> tuple[int, protocol.Factory, object]:
    factory = protocol.Factory.forProtocol(proto_class)
    factory.noisy = False
    factory.connections = []
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    return port.getHost().port, factory, port
