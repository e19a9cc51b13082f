"""The benchmark's zero-copy load generator counts exactly what it is sent.

The client discards stream payload in the kernel (``MSG_PEEK`` for WebSocket frame headers,
``MSG_TRUNC`` for payloads), so these tests run it over real TCP connections: hand-built
frames of many sizes, control frames and headers split over reads must give the same payload
count as the copying parser. The server sends its stream with ``sendfile``: it must still be
whole FramebufferUpdates, flat out and at a rate, while KeyEvents keep being read.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from bench.rfbclient import (
    FB_UPDATE_REQUEST,
    BlockingSession,
    FrameParser,
    Target,
    frame_header,
    key_event,
)

REPO = Path(__file__).resolve().parent.parent.parent


def server_frame(payload: bytes, opcode: int = 2, mask: bytes | None = None) -> bytes:
    """A server frame; with ``mask`` the mask bit and key are set (the payload is left as is:
    only its length matters here)."""
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, bit | n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, bit | 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, bit | 127, n)
    return head + (mask or b"") + payload


SIZES = [0, 1, 13, 125, 126, 127, 1000, 65535, 65536, 65537, 300_000, 1 << 20]


def stream_and_expected() -> tuple[bytes, int, list[tuple[int, bytes]]]:
    """Data frames of SIZES (one masked, one a continuation), a ping and a pong among them,
    and a close at the end: (bytes, payload bytes, control frames)."""
    out = bytearray()
    control = []
    for i, n in enumerate(SIZES):
        out += server_frame(
            bytes([i % 256]) * n, opcode=0 if i == 3 else 2, mask=b"abcd" if i == 5 else None
        )
        if i == 4:
            out += server_frame(b"ping!", opcode=9)
            control.append((9, b"ping!"))
        if i == 7:
            out += server_frame(b"", opcode=10)
            control.append((10, b""))
    out += server_frame(struct.pack(">H", 1000), opcode=8)
    control.append((8, struct.pack(">H", 1000)))
    return bytes(out), sum(SIZES), control


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (sender, receiver) pair over loopback TCP (MSG_TRUNC discards on TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sender, receiver


def header_splits(data: bytes) -> list[int]:
    """Offsets inside every frame header (after 1 byte, and before its last byte)."""
    cuts = set()
    pos = 0
    while pos < len(data):
        size, length, _ = frame_header(data[pos : pos + 14])
        cuts.update({pos + 1, pos + size - 1})
        pos += size + length
    return sorted(c for c in cuts if 0 < c < len(data))


def test_frame_header_sizes():
    assert frame_header(b"\x82") is None
    assert frame_header(b"\x82\x05") == (2, 5, 2)
    assert frame_header(b"\x82\x7e\x01") is None
    assert frame_header(b"\x82\x7e\x01\x00") == (4, 256, 2)
    assert frame_header(b"\x89\xfe\x01\x00abc") is None  # masked: 4 more bytes
    assert frame_header(b"\x89\xfe\x01\x00abcd") == (8, 256, 9)
    assert frame_header(b"\x80\x7f" + struct.pack(">Q", 1 << 33)) == (10, 1 << 33, 0)


def test_copying_parser_agrees_with_the_expected_counts():
    data, payload, control = stream_and_expected()
    p = FrameParser(keep=False)
    got = 0
    for a, b in zip([0] + header_splits(data), header_splits(data) + [len(data)], strict=True):
        got += p.feed(memoryview(data)[a:b])
    assert got == payload
    assert p.control == control


def unacked(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def test_skim_counts_frames_split_anywhere_over_a_real_socket():
    """Sender and reader in one thread, step by step: each piece (cut inside every header)
    is all on the reader's socket before it reads it out, so split headers really are
    read split."""
    data, payload, control = stream_and_expected()
    sender, receiver = tcp_pair()
    sender.setblocking(False)
    receiver.setblocking(False)
    parser = FrameParser(keep=False)
    got = 0
    saw_split = False

    def drain() -> None:
        nonlocal got, saw_split
        while True:
            try:
                n = parser.skim(receiver)
            except BlockingIOError:
                return
            assert n >= 0
            got += n
            saw_split = saw_split or bool(parser.head)

    pos = 0
    try:
        for cut in header_splits(data) + [len(data)]:
            while pos < cut:
                try:
                    pos += sender.send(memoryview(data)[pos:cut])
                except BlockingIOError:
                    pass
                drain()  # the sender may be waiting for our window
            wait_for(lambda: unacked(sender) == 0, "piece delivered")
            drain()
        sender.close()
        receiver.setblocking(True)
        while (n := parser.skim(receiver)) >= 0:
            got += n
    finally:
        receiver.close()
    assert got == payload
    assert parser.control == control
    assert saw_split


def test_blocking_session_counts_a_ws_stream():
    """A BlockingSession reads a stream written from another process's socket in pieces."""
    data, payload, control = stream_and_expected()
    sender, receiver = tcp_pair()
    pid = os.fork()
    if pid == 0:  # the writer: uneven pieces, with pauses so reads see partial frames
        try:
            receiver.close()
            step = 7
            pos = 0
            while pos < len(data):
                sender.sendall(data[pos : pos + step])
                pos += step
                step = step * 3 % 200_003
                time.sleep(0.001)
            sender.close()
        finally:
            os._exit(0)
    sender.close()
    s = BlockingSession.__new__(BlockingSession)
    s.target = Target("ws", "127.0.0.1", 0)
    s.ws = True
    s.sock = receiver
    s.parser = FrameParser(keep=False)
    s.rfb = bytearray()
    s.closed = False
    try:
        got, _ = s.stream_for(600)  # ends with the close frame
    finally:
        os.waitpid(pid, 0)
        receiver.close()
    assert got == payload
    assert s.closed


# --- the server ---------------------------------------------------------------------------


@pytest.fixture
def rfbserver(tmp_path, request):
    ports_file = tmp_path / "ports.json"
    args = getattr(request, "param", [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.rfbserver", "--ports-file", str(ports_file), *args], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 15
        while not ports_file.exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "rfbserver exited"
            time.sleep(0.05)
        ports = json.loads(ports_file.read_text())

        def stats() -> dict:
            with socket.create_connection(("127.0.0.1", ports["control"]), timeout=5) as c:
                c.sendall(b"stats\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += c.recv(4096)
            return json.loads(data)

        yield ports, stats
    finally:
        proc.terminate()
        proc.wait(10)


def read_updates(s: BlockingSession, count: int) -> int:
    """Read ``count`` whole FramebufferUpdates (copying), checking each; bytes read."""
    total = 0
    for _ in range(count):
        head = s.read(16)
        kind, rects = struct.unpack_from(">BxH", head)
        x, y, w, h, encoding = struct.unpack_from(">HHHHi", head, 4)
        assert (kind, rects, encoding) == (0, 1, 0), head
        body = s.read(w * h * 4)
        assert body[:256] == bytes(range(256))
        total += 16 + len(body)
    return total


def connect(ports: dict, mode: str = "stream") -> BlockingSession:
    """A raw-TCP session to the server's ``mode`` port, past ServerInit (stream: requested)."""
    s = BlockingSession(Target("tcp", "127.0.0.1", ports[mode]))
    s.handshake()
    if mode == "stream":
        s.send(FB_UPDATE_REQUEST)
    return s


def wait_for(check, what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize(
    "rfbserver", [[], ["--rate", "4000000"]], indirect=True, ids=["flat-out", "rate"]
)
def test_server_streams_whole_updates_and_reads_keys(rfbserver):
    ports, stats = rfbserver
    s = connect(ports)
    try:
        read = read_updates(s, 20)  # more than the server's file holds: it wraps around
        s.send(key_event(1, 0x61))
        s.send(FB_UPDATE_REQUEST)  # a second request does not start a second stream
        read += read_updates(s, 4)
        wait_for(lambda: stats()["keys"] == 1, "KeyEvent counted while streaming")
        sent = stats()["bytes_sent"]
        assert read <= sent
    finally:
        s.close()
    wait_for(lambda: stats()["active"] == 0, "connection closed")


def test_skimmed_count_matches_the_server(rfbserver):
    """A raw-TCP skim count is what the server sent, less what sits in socket buffers."""
    ports, stats = rfbserver
    s = connect(ports)
    try:
        got = 0
        while got < 200 << 20:
            got += s.skim()
        sent = stats()["bytes_sent"]
        assert 0 <= sent - got <= 64 << 20
    finally:
        s.close()


def test_server_echo_and_many_streams(rfbserver):
    ports, stats = rfbserver
    echo = connect(ports, "echo")
    streams = [connect(ports) for _ in range(4)]
    sel = selectors.DefaultSelector()
    try:
        echo.send(key_event(1, 0x62))
        assert echo.read(1) == b"\x02"
        for s in streams:
            s.sock.setblocking(False)
            sel.register(s.sock, selectors.EVENT_READ, s)
        counts = {id(s): 0 for s in streams}
        while min(counts.values()) < 8 << 20:
            for key, _ in sel.select(5):
                try:
                    counts[id(key.data)] += key.data.skim()
                except BlockingIOError:
                    pass
        assert sum(counts.values()) <= stats()["bytes_sent"]
    finally:
        for s in [echo, *streams]:
            s.close()
