"""Fast benchmark clients: RFB 3.8 over a raw-socket WebSocket (subprotocol ``binary``), or
raw RFB over TCP (for socat and direct connections, which speak no WebSocket).

The WebSocket framing is our own and minimal: client frames are masked (the mask is random
per connection, applied with one big-integer XOR), server frames are unmasked and parsed
without copying the payload when only its size matters: streams are read with ``MSG_PEEK``
for frame headers and ``MSG_TRUNC`` for payloads, which the kernel discards without copying
them to user space (raw TCP streams are discarded the same way). Autobahn is far slower than this
and would make the client the bottleneck.
"""

from __future__ import annotations

import asyncio
import base64
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass

VERSION = b"RFB 003.008\n"
SERVER_INIT_FIXED = 24  # u16 w, u16 h, 16-byte pixel format, u32 name length


@dataclass(frozen=True)
class Target:
    """Where a client connects: ``kind`` is ``ws`` (WebSocket) or ``tcp`` (raw RFB)."""

    kind: str
    host: str
    port: int
    path: str = "/"
    origin: str | None = None


def key_event(down: int, key: int) -> bytes:
    """An RFB KeyEvent (8 bytes)."""
    return struct.pack(">BBxxI", 4, down, key)


FB_UPDATE_REQUEST = struct.pack(">BBHHHH", 3, 0, 0, 0, 1024, 768)


class HandshakeError(ConnectionError):
    pass


# --- WebSocket framing ------------------------------------------------------------------


def ws_request(target: Target) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target.path} HTTP/1.1",
        f"Host: {target.host}:{target.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: binary",
    ]
    if target.origin:
        lines.append(f"Origin: {target.origin}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def check_ws_response(head: bytes) -> None:
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status + b" ":
        raise HandshakeError(f"WebSocket upgrade refused: {status[:100]!r}")


def ws_frame(payload: bytes, opcode: int = 2) -> bytes:
    """One masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0xFF, n)
    mask = os.urandom(4)
    if n:
        m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        body = (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")
    else:
        body = b""
    return head + mask + body


def frame_header(head) -> tuple[int, int, int] | None:
    """(header size, payload length, opcode) of the frame ``head`` begins with; None while
    ``head`` is too short to tell."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    size = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if head[1] & 0x80 else 0)
    if len(head) < size:
        return None
    if length == 126:
        length = struct.unpack_from(">H", head, 2)[0]
    elif length == 127:
        length = struct.unpack_from(">Q", head, 2)[0]
    return size, length, head[0] & 0x0F


# Discarded data is never copied (MSG_TRUNC), so the sink's pages are never touched: an
# anonymous mapping this size costs address space only, and lets one recv discard all a
# socket holds (loopback receive buffers grow to 6 MiB).
SINK_SIZE = 16 << 20
SINK = mmap.mmap(-1, SINK_SIZE)


class FrameParser:
    """Incremental parser of unmasked server frames.

    ``feed(view)`` returns the binary/continuation payload bytes seen; with ``keep`` the
    payload is appended to ``self.data`` too. Control frames are collected in ``control``
    (opcode, payload) so the owner can answer pings and notice close frames. ``skim(sock)``
    reads from the socket itself and discards data payloads without copying them.
    """

    __slots__ = ("remaining", "head", "keep", "data", "control", "_opcode", "_ctl")

    def __init__(self, keep: bool = True):
        self.remaining = 0
        self.head = b""
        self.keep = keep
        self.data = bytearray()
        self.control: list[tuple[int, bytes]] = []
        self._opcode = 2
        self._ctl = bytearray()

    def _begin(self, length: int, opcode: int) -> None:
        """A frame header was consumed: its payload comes next."""
        self.head = b""
        if opcode != 0:  # 0 continues the current message
            self._opcode = opcode
        if opcode >= 8:
            self._ctl = bytearray()
            if length == 0:
                self.control.append((opcode, b""))
        self.remaining = length

    def feed(self, view) -> int:
        pos = 0
        n = len(view)
        payload = 0
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                if self._opcode >= 8:
                    self._ctl += view[pos : pos + take]
                else:
                    payload += take
                    if self.keep:
                        self.data += view[pos : pos + take]
                pos += take
                self.remaining -= take
                if not self.remaining and self._opcode >= 8:
                    self.control.append((self._opcode, bytes(self._ctl)))
                continue
            # A frame header, possibly split over reads.
            head = self.head + bytes(view[pos : pos + 14])
            parsed = frame_header(head)
            if parsed is None:
                self.head = head  # all that was left of view
                return payload
            size, length, opcode = parsed
            pos += size - len(self.head)
            self._begin(length, opcode)
        return payload

    def skim(self, sock: socket.socket) -> int:
        """One step of reading ``sock`` with data payloads discarded by the kernel.

        Returns the payload bytes discarded (0 for a header or control step); -1 at the end
        of the stream. A frame header is peeked (``MSG_PEEK``, ≤ 14 bytes), then the header
        and as much of the payload as is there go in one ``MSG_TRUNC`` recv, which drops
        them in the kernel without copying. Split headers and control frames are small and
        go through :meth:`feed`. On a non-blocking socket, raises ``BlockingIOError`` when
        there is nothing to read (before consuming anything).
        """
        if self.remaining and self._opcode < 8:
            n = sock.recv_into(SINK, min(self.remaining, SINK_SIZE), socket.MSG_TRUNC)
            if not n:
                return -1
            self.remaining -= n
            return n
        if self.remaining:  # the rest of a control frame
            data = sock.recv(self.remaining)
            if not data:
                return -1
            self.feed(data)
            return 0
        have = len(self.head)
        peek = sock.recv(14 - have, socket.MSG_PEEK)
        if not peek:
            return -1
        parsed = frame_header(self.head + peek)
        if parsed is None or parsed[2] >= 8:
            # Part of a header (consumed into self.head), or a whole control frame.
            take = len(peek) if parsed is None else parsed[0] - have + parsed[1]
            data = sock.recv(take)
            if not data:
                return -1
            self.feed(data)
            return 0
        size, length, opcode = parsed
        take = size - have  # the header's bytes are all there: n >= take
        n = sock.recv_into(SINK, min(take + length, SINK_SIZE), socket.MSG_TRUNC)
        self._begin(length - (n - take), opcode)
        return n - take


# --- blocking client ---------------------------------------------------------------------


class BlockingSession:
    """One RFB session over a blocking socket: for throughput, latency, sequential setup."""

    def __init__(self, target: Target, timeout: float = 10.0):
        self.target = target
        self.ws = target.kind == "ws"
        self.sock = socket.create_connection((target.host, target.port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.parser = FrameParser(keep=True)
        self.rfb = bytearray()  # RFB bytes received, not yet consumed
        self.closed = False

    def handshake(self) -> None:
        """WebSocket upgrade (if any) and RFB 3.8 security None, up to the end of ServerInit."""
        sock = self.sock
        if self.ws:
            sock.sendall(ws_request(self.target))
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise HandshakeError("closed during WebSocket upgrade")
                head += chunk
            head, rest = head.split(b"\r\n\r\n", 1)
            check_ws_response(head)
            if rest:
                self._absorb(rest)
        version = self.read(12)
        if version != VERSION:
            raise HandshakeError(f"unexpected version {version!r}")
        self.send(VERSION)
        count = self.read(1)[0]
        types = self.read(count)
        if 1 not in types:
            raise HandshakeError(f"security None not offered: {list(types)}")
        self.send(b"\x01")
        if self.read(4) != b"\x00\x00\x00\x00":
            raise HandshakeError("SecurityResult failed")
        self.send(b"\x01")
        fixed = self.read(SERVER_INIT_FIXED)
        self.read(struct.unpack_from(">I", fixed, 20)[0])

    def send(self, data: bytes) -> None:
        self.sock.sendall(ws_frame(data) if self.ws else data)

    def _absorb(self, data) -> None:
        if self.ws:
            self.parser.feed(data)
            if self.parser.data:
                self.rfb += self.parser.data
                self.parser.data.clear()
            self._control()
        else:
            self.rfb += data

    def _control(self) -> None:
        for opcode, payload in self.parser.control:
            if opcode == 9:
                self.sock.sendall(ws_frame(payload, opcode=10))
            elif opcode == 8:
                self.closed = True
        self.parser.control.clear()

    def read(self, n: int) -> bytes:
        while len(self.rfb) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HandshakeError(f"closed while waiting for {n} bytes")
            self._absorb(chunk)
        out = bytes(self.rfb[:n])
        del self.rfb[:n]
        return out

    def skim(self) -> int:
        """One zero-copy read step of a stream: RFB payload bytes discarded; sets
        ``closed`` at its end (see :meth:`FrameParser.skim`)."""
        if self.ws:
            n = self.parser.skim(self.sock)
            if self.parser.control:
                self._control()
        else:
            n = self.sock.recv_into(SINK, SINK_SIZE, socket.MSG_TRUNC) or -1
        if n < 0:
            self.closed = True
            return 0
        return n

    def stream_for(self, seconds: float) -> tuple[int, float]:
        """Read (and only count) RFB payload for ``seconds``; returns (bytes, elapsed)."""
        total = len(self.rfb)
        self.rfb.clear()
        start = now = time.perf_counter()
        end = start + seconds
        skim = self.skim
        clock = time.perf_counter
        while not self.closed:
            total += skim()
            now = clock()
            if now >= end:
                break
        return total, now - start

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# --- asyncio client (many sessions) --------------------------------------------------------


class AsyncSession:
    """One RFB session on asyncio streams: for concurrent setup and idle sessions."""

    def __init__(self, target: Target):
        self.target = target
        self.ws = target.kind == "ws"
        self.parser = FrameParser(keep=True)
        self.rfb = bytearray()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._drain_task: asyncio.Task | None = None

    async def handshake(self) -> None:
        t = self.target
        self.reader, self.writer = await asyncio.open_connection(t.host, t.port, limit=1 << 16)
        if self.ws:
            self.writer.write(ws_request(t))
            head = await self.reader.readuntil(b"\r\n\r\n")
            check_ws_response(head)
        version = await self.read(12)
        if version != VERSION:
            raise HandshakeError(f"unexpected version {version!r}")
        self.send(VERSION)
        count = (await self.read(1))[0]
        types = await self.read(count)
        if 1 not in types:
            raise HandshakeError("security None not offered")
        self.send(b"\x01")
        if await self.read(4) != b"\x00\x00\x00\x00":
            raise HandshakeError("SecurityResult failed")
        self.send(b"\x01")
        fixed = await self.read(SERVER_INIT_FIXED)
        await self.read(struct.unpack_from(">I", fixed, 20)[0])

    def send(self, data: bytes) -> None:
        self.writer.write(ws_frame(data) if self.ws else data)

    async def read(self, n: int) -> bytes:
        while len(self.rfb) < n:
            chunk = await self.reader.read(65536)
            if not chunk:
                raise HandshakeError(f"closed while waiting for {n} bytes")
            self._absorb(chunk)
        out = bytes(self.rfb[:n])
        del self.rfb[:n]
        return out

    def _absorb(self, data: bytes) -> None:
        if self.ws:
            self.parser.feed(data)
            self.rfb += self.parser.data
            self.parser.data.clear()
            for opcode, payload in self.parser.control:
                if opcode == 9:
                    self.writer.write(ws_frame(payload, opcode=10))
            self.parser.control.clear()
        else:
            self.rfb += data

    def keep_alive(self) -> None:
        """Keep reading in the background (answer pings, notice a close) while idle."""
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while True:
                chunk = await self.reader.read(4096)
                if not chunk:
                    return
                self._absorb(chunk)
                self.rfb.clear()
        except (OSError, asyncio.CancelledError):
            return

    @property
    def alive(self) -> bool:
        return self._drain_task is not None and not self._drain_task.done()

    def close(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()
        if self.writer is not None:
            self.writer.transport.abort()
