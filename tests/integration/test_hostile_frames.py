"""A hostile browser's WebSocket framing against a real cpvm process.

One large frame trickled in 1 KiB reads must cost cpvm about what the same bytes cost as
1 KiB frames in as many reads (the frame parser is linear), while another console in the
same process keeps answering keystrokes.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest_twisted
from twisted.internet import reactor, task, threads

from tests.integration import scripted_vnc
from tests.rawws import RawWebSocket
from tests.wsclient import open_console

FRAME_PAYLOAD = 16 * 1024 * 1024  # one frame of the largest size the test cpvm admits
PIECE = 1024
# Both ways below take the same number of reads; a linear parser costs about the same for
# both (the one big frame is even delivered once instead of 16384 times), the quadratic
# one re-copied the pending frame on every read (17x here, growing with the size).
MAX_CPU_RATIO = 3


def cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def client_frame(payload: bytes) -> bytes:
    """A final, masked, binary frame, masked independently of cpvm's code."""
    mask = os.urandom(4)
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    if n < 126:
        length = bytes((0x80 | n,))
    elif n < 65536:
        length = bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        length = bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return b"\x82" + length + mask + masked


def clipboard_message() -> bytes:
    """One ClientCutText of FRAME_PAYLOAD bytes in all."""
    text = b"a" * (FRAME_PAYLOAD - 8)
    return struct.pack("!B3xI", 6, len(text)) + text


def one_frame_in_pieces() -> list[bytes]:
    """The attack: the message as one frame, sent in 1 KiB pieces."""
    frame = client_frame(clipboard_message())
    return [frame[i : i + PIECE] for i in range(0, len(frame), PIECE)]


def small_frames() -> list[bytes]:
    """The same message as noVNC would send it: a 1 KiB frame per piece."""
    message = clipboard_message()
    return [client_frame(message[i : i + PIECE]) for i in range(0, len(message), PIECE)]


def send_pieces(port: int, token: str, pid: int, sink, pieces: list[bytes]) -> int:
    """Runs in a thread: the pieces one by one; cpvm's CPU ticks until the VNC server has
    every byte."""
    ws = RawWebSocket("127.0.0.1", port, f"/websockify?token={token}")
    try:
        ws.rfb_handshake()
        before = cpu_ticks(pid)
        for piece in pieces:
            ws.sock.sendall(piece)
            time.sleep(0.0005)  # let cpvm read each piece on its own
        deadline = time.monotonic() + 120
        while sink.received < FRAME_PAYLOAD and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sink.received == FRAME_PAYLOAD, "the message did not reach the VNC server"
        return cpu_ticks(pid) - before
    finally:
        ws.close()


async def type_until(bystander, done) -> int:
    """A person typing in another console until ``done`` fires: each key must come back
    through its VNC server (echo). Returns how many did."""
    answered = 0
    while not done.called:
        key = struct.pack("!BBxxI", 4, 1, 0x61 + answered % 26)
        bystander.send(key)
        assert await bystander.read(len(key), timeout=10) == key
        answered += 1
        await task.deferLater(reactor, 0.05, lambda: None)
    return answered


@pytest_twisted.ensureDeferred
async def test_a_trickled_big_frame_costs_linear_cpu_and_stalls_nobody(cpvm_factory, manager):
    cpvm = cpvm_factory(session={"max_message_size": FRAME_PAYLOAD})
    sink_port, sinks, sink_listening = scripted_vnc.listen(scripted_vnc.SinkRfb)
    echo_port, _, echo_listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": echo_port})
        bystander = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
        await bystander.rfb_handshake()
        costs = {}
        for index, pieces in enumerate((small_frames(), one_frame_in_pieces())):
            token, _ = manager.issue({"host": "127.0.0.1", "port": sink_port})
            sent = threads.deferToThread(
                send_pieces, cpvm.port, token, cpvm.pid, _Later(sinks, index), pieces
            )
            answered = await type_until(bystander, sent)
            costs[index] = await sent
            assert answered >= 10, f"only {answered} keystrokes answered meanwhile"
        small, trickled = costs[0], costs[1]
        assert trickled <= MAX_CPU_RATIO * max(small, 1), (
            f"one frame in 1 KiB pieces cost {trickled} ticks, 1 KiB frames {small}"
        )
        bystander.sendClose(1000)
        await bystander.wait_closed()
    finally:
        await sink_listening.stopListening()
        await echo_listening.stopListening()


def read_frame(ws: RawWebSocket) -> tuple[int, bytes]:
    """One server frame (unmasked): its first byte and payload."""
    b0, b1 = ws._read(2)
    length = b1 & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", ws._read(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", ws._read(8))
    return b0, ws._read(length)


EXPECTED_ECHO = b"onetwofrag-mentedthree"


def control_and_fragments(port: int, token: str) -> list[tuple[int, bytes]]:
    """Runs in a thread: a split ping, a fragmented message, each between plain frames."""
    ws = RawWebSocket("127.0.0.1", port, f"/websockify?token={token}")
    try:
        ws.rfb_handshake()
        ping = client_frame(b"are you there")
        ping = bytes((0x89,)) + ping[1:]
        first = bytes((0x02,)) + client_frame(b"frag-")[1:]  # binary, not final
        last = bytes((0x80,)) + client_frame(b"mented")[1:]  # final continuation
        for piece in (
            client_frame(b"one"),
            ping[:8],
            ping[8:] + client_frame(b"two"),
            first,
            last + client_frame(b"three"),
        ):
            ws.sock.sendall(piece)
            time.sleep(0.05)  # separate reads: hand-offs in the middle of a frame
        got: list[tuple[int, bytes]] = []
        # Echoes may arrive coalesced: read until the pong and every echoed byte came.
        while sum(len(p) for b0, p in got if b0 == 0x82) < len(EXPECTED_ECHO) or not any(
            b0 == 0x8A for b0, _ in got
        ):
            got.append(read_frame(ws))
        return got
    finally:
        ws.close()


@pytest_twisted.ensureDeferred
async def test_pings_and_fragments_between_fast_frames(cpvm, manager):
    echo_port, _, echo_listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": echo_port})
        frames = await threads.deferToThread(control_and_fragments, cpvm.port, token)
        pongs = [payload for b0, payload in frames if b0 == 0x8A]
        echoed = b"".join(payload for b0, payload in frames if b0 == 0x82)
        assert pongs == [b"are you there"]
        assert echoed == EXPECTED_ECHO
    finally:
        await echo_listening.stopListening()


class _Later:
    """The sink server's n-th connection, looked up when the attacker polls it."""

    def __init__(self, factory, index: int):
        self._factory = factory
        self._index = index

    @property
    def received(self) -> int:
        conns = self._factory.connections
        return conns[self._index].received if len(conns) > self._index else 0
