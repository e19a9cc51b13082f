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
    server_init = SERVER_INIT

    def connectionMade(self):  # noqa: N802
        self.factory.connections.append(self)
        self.buf = b""
        self.stage = "version"
        self.received = 0
        self.transport.write(b"RFB 003.008\n")

    def dataReceived(self, data):  # noqa: N802
        if self.stage == "relay":
            self.received += len(data)
            self.relayed(data)
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
            self.shared_flag = self.buf[0]  # the ClientInit the proxy sent
            rest, self.buf = self.buf[1:], b""
            self.transport.write(self.server_init)
            self.stage = "relay"
            if rest:
                self.dataReceived(rest)

    def relayed(self, data):
        """Bytes from the client after ClientInit."""
        if self.echo:
            self.transport.write(data)


class SinkRfb(EchoRfb):
    """Like ``EchoRfb``, but only counts what it receives after ClientInit."""

    echo = False


# 32 bpp, depth 24, little endian, true colour: what QEMU announces (noVNC draws with it).
TRUE_COLOUR = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
QEMU_EXTENDED_KEY_EVENT = struct.pack("!i", -258)


class RecordingRfb(EchoRfb):
    """Records every byte the client sends after ClientInit (``.received_bytes``).

    Like QEMU it confirms the QEMU Extended Key Event pseudo-encoding when the client asks
    for it (an empty pseudo-rectangle), so noVNC then sends its keys as scancodes too.
    """

    echo = False
    server_init = struct.pack("!HH", 64, 48) + TRUE_COLOUR + struct.pack("!I", 4) + b"rec1"

    def connectionMade(self):  # noqa: N802
        self.received_bytes = bytearray()
        self.confirmed = False
        super().connectionMade()

    def relayed(self, data):
        self.received_bytes += data
        if not self.confirmed and QEMU_EXTENDED_KEY_EVENT in self.received_bytes:
            self.confirmed = True
            rect = struct.pack("!HHHHi", 0, 0, 0, 0, -258)
            self.transport.write(b"\x00\x00\x00\x01" + rect)


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
