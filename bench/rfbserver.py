"""A synthetic RFB 3.8 server (security None) for the benchmark, run as its own process.

One asyncio process listens on three ports, one per mode:

* ``stream``: after the client's first FramebufferUpdateRequest, sends raw-encoded
  FramebufferUpdate messages (one large rectangle each) flat out, or at ``--rate`` bytes/s
  per connection. The updates are prebuilt once in a memory file and written from it
  in large non-blocking writes (or ``--sendfile``) when the socket is writable: no Python
  object per update, no asyncio buffer, and a slow reader slows the stream instead of
  filling this process's memory.
* ``echo``: answers each KeyEvent at once with a Bell (one byte, message type 2).
* ``idle``: completes the handshake and then says nothing.

KeyEvents are counted in every mode; a control port answers ``stats`` with a JSON line
(keys received, connections, bytes sent) so the harness can check that input got through
a proxy while the screen stream was backed up.

``python3 -m bench.rfbserver --ports-file F`` writes ``{"stream": P, "echo": P, "idle": P,
"control": P}`` to F once listening (ports chosen by the kernel).
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import mmap
import os
import resource
import socket
import struct

VERSION = b"RFB 003.008\n"
WIDTH, HEIGHT = 1024, 768
# 32 bpp, depth 24, little-endian, true colour, 255/255/255, shifts 16/8/0.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBBxxx", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
NAME = b"cpvm-bench"
SERVER_INIT = struct.pack(">HH", WIDTH, HEIGHT) + PIXEL_FORMAT + struct.pack(">I", len(NAME)) + NAME
BELL = b"\x02"
# Fixed lengths of client messages by type; SetEncodings (2) and ClientCutText (6) vary.
_FIXED = {0: 20, 3: 10, 4: 8, 5: 6}


# Updates per stream source: several MB, so one call can fill a whole socket buffer.
UPDATES_PER_FILE = 16


def framebuffer_update(width: int, height: int) -> bytes:
    """One FramebufferUpdate with a single raw rectangle of width x height at 32 bpp."""
    header = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, width, height, 0)
    return header + bytes(range(256)) * (width * height * 4 // 256)


class StreamSource:
    """``count`` copies of ``update`` in a memory file, which every stream sends from,
    wrapping around at its end; as it holds whole messages only, the byte stream stays a
    sequence of whole FramebufferUpdates.

    By default a stream writes straight from the file's mapping (one copy, in the kernel;
    nothing in Python touches the bytes). With ``sendfile`` the kernel sends the file's
    pages themselves, zero-copy, which is cheaper here but costs the relay reading them:
    socat's CPU per GB grew by ~35 % and its throughput fell by ~25 % (skbs that reference
    page-cache pages), so it would measure the relays under other conditions.
    """

    def __init__(self, update: bytes, count: int = UPDATES_PER_FILE, sendfile: bool = False):
        self.fd = os.memfd_create("rfb-stream", os.MFD_CLOEXEC)
        with open(self.fd, "wb", closefd=False) as f:
            for _ in range(count):
                f.write(update)
        self.size = count * len(update)
        self.sendfile = sendfile
        self.view = memoryview(mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ))

    def send(self, out: int, offset: int, count: int) -> int:
        """Send ``count`` bytes from ``offset`` on descriptor ``out``; bytes sent."""
        if self.sendfile:
            return os.sendfile(out, self.fd, offset, count)
        return os.write(out, self.view[offset : offset + count])


class Streamer:
    """Sends one connection's stream from the shared :class:`StreamSource`, non-blocking.

    It works on a duplicate of the connection's descriptor: asyncio refuses writer
    callbacks on a descriptor its transport owns, and the transport keeps reading the
    client's messages (KeyEvents) meanwhile. Flat out, it sends whenever the socket is
    writable; at a rate, a timer hands out byte credit (capped, so a full socket does not
    earn a burst).
    """

    def __init__(self, protocol: "RfbServerProtocol", sock: socket.socket):
        self.protocol = protocol
        self.loop = asyncio.get_running_loop()
        self.fd = os.dup(sock.fileno())
        self.source = protocol.source
        self.size = self.source.size
        self.offset = 0
        self.rate = protocol.rate
        self.stopped = False
        self._credit = 0.0
        self._last = self.loop.time()
        if self.rate:
            self._tick()
        else:
            self.loop.add_writer(self.fd, self._writable)

    def _send(self, budget: int) -> int:
        """Send until the socket is full or ``budget`` bytes are sent; bytes sent."""
        sent = 0
        while sent < budget:
            count = min(self.size - self.offset, budget - sent)
            try:
                n = self.source.send(self.fd, self.offset, count)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    self.protocol.lost()
                    break
                raise
            sent += n
            self.offset = (self.offset + n) % self.size
            if n < count:  # the socket buffer is full
                break
        self.protocol.stats.bytes_sent += sent
        return sent

    def _writable(self) -> None:
        if not self.stopped:
            self._send(1 << 62)

    def _tick(self) -> None:
        if self.stopped:
            return
        now = self.loop.time()
        cap = 4 * len(self.protocol.update)
        self._credit = min(self._credit + (now - self._last) * self.rate, cap)
        self._last = now
        self._credit -= self._send(int(self._credit))
        self.loop.call_later(0.005, self._tick)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if not self.rate:
            self.loop.remove_writer(self.fd)
        os.close(self.fd)


class Stats:
    def __init__(self) -> None:
        self.keys = 0
        self.connections = 0
        self.active = 0
        self.bytes_sent = 0

    def as_dict(self) -> dict:
        return dict(
            keys=self.keys,
            connections=self.connections,
            active=self.active,
            bytes_sent=self.bytes_sent,
        )


class RfbServerProtocol(asyncio.Protocol):
    """Server side of RFB 3.8 with security None, then the mode's behaviour."""

    def __init__(self, mode: str, stats: Stats, update: bytes, rate: float, source: StreamSource):
        self.mode = mode
        self.stats = stats
        self.update = update
        self.rate = rate
        self.source = source
        self.buf = bytearray()
        self.state = "version"
        self.streaming = False
        self.streamer: Streamer | None = None
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stats.connections += 1
        self.stats.active += 1
        transport.write(VERSION)

    def connection_lost(self, exc):  # type: ignore[override]
        self.closed = True
        self.stats.active -= 1
        if self.streamer is not None:
            self.streamer.stop()

    def lost(self) -> None:
        """The stream's socket failed (the peer went away): close the connection."""
        if self.streamer is not None:
            self.streamer.stop()
        self.transport.abort()

    def data_received(self, data):  # type: ignore[override]
        buf = self.buf
        buf += data
        t = self.transport
        while True:
            if self.state == "version":
                if len(buf) < 12:
                    return
                del buf[:12]
                t.write(b"\x01\x01")
                self.state = "security"
            elif self.state == "security":
                if len(buf) < 1:
                    return
                del buf[:1]
                t.write(b"\x00\x00\x00\x00")
                self.state = "clientinit"
            elif self.state == "clientinit":
                if len(buf) < 1:
                    return
                del buf[:1]
                t.write(SERVER_INIT)
                self.state = "normal"
            else:
                if not buf:
                    return
                kind = buf[0]
                if kind in _FIXED:
                    n = _FIXED[kind]
                elif kind == 2:
                    if len(buf) < 4:
                        return
                    n = 4 + 4 * struct.unpack_from(">H", buf, 2)[0]
                elif kind == 6:
                    if len(buf) < 8:
                        return
                    n = 8 + struct.unpack_from(">I", buf, 4)[0]
                else:  # unknown: drop what we have
                    buf.clear()
                    return
                if len(buf) < n:
                    return
                del buf[:n]
                if kind == 4:
                    self.stats.keys += 1
                    if self.mode == "echo":
                        t.write(BELL)
                elif kind == 3 and self.mode == "stream" and not self.streaming:
                    self.streaming = True
                    self._start_stream()

    def _start_stream(self) -> None:
        if self.closed:
            return
        # Streams bypass the transport: what the transport still buffers (the end of
        # the handshake, rarely) must go out first or the stream would overtake it.
        if self.transport.get_write_buffer_size():
            asyncio.get_running_loop().call_later(0.001, self._start_stream)
            return
        self.streamer = Streamer(self, self.transport.get_extra_info("socket"))


class ControlProtocol(asyncio.Protocol):
    """``stats\\n`` -> one JSON line."""

    def __init__(self, stats: Stats):
        self.stats = stats
        self.buf = b""

    def connection_made(self, transport):  # type: ignore[override]
        self.transport = transport

    def data_received(self, data):  # type: ignore[override]
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip() == b"stats":
                self.transport.write(json.dumps(self.stats.as_dict()).encode() + b"\n")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    update = framebuffer_update(args.rect_width, args.rect_height)
    source = StreamSource(update, sendfile=args.sendfile)
    ports = {}
    servers = []
    for mode in ("stream", "echo", "idle"):
        server = await loop.create_server(
            lambda mode=mode: RfbServerProtocol(mode, stats, update, args.rate, source),
            args.host,
            0,
            backlog=4096,
            reuse_address=True,
        )
        servers.append(server)
        ports[mode] = server.sockets[0].getsockname()[1]
    control = await loop.create_server(lambda: ControlProtocol(stats), args.host, 0)
    ports["control"] = control.sockets[0].getsockname()[1]
    tmp = args.ports_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, args.ports_file)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ports-file", required=True)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="stream bytes/s per connection (0: flat out)"
    )
    parser.add_argument(
        "--sendfile", action="store_true", help="stream with sendfile (zero-copy; see StreamSource)"
    )
    parser.add_argument("--rect-width", type=int, default=256)
    parser.add_argument("--rect-height", type=int, default=256)
    args = parser.parse_args(argv)
    raise_fd_limit()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
