"""Backpressure: a browser reading 100 KB/s while the VNC server streams flat out.

cpvm must slow the VNC server down (TCP backpressure) instead of buffering: its memory
stays bounded, the server can only send what the buffers along the way hold, and a key
typed by that slow browser still reaches the VNC server at once.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.daemons import process_rss_kib
from tests.peers import REPO_ROOT, Supervised, make_workdir
from tests.rawws import RawWebSocket

READ_RATE = 100 * 1024  # bytes per second
DURATION = 20.0
# What may legitimately sit between the server and the slow reader: kernel socket buffers
# on two TCP connections (auto-tuned up to ~6 MiB each) plus cpvm's per-side bound.
MAX_IN_FLIGHT = 24 * 1024 * 1024
MAX_RSS_GROWTH_KIB = 16 * 1024


@pytest.fixture
def stream_server():
    workdir = make_workdir("rfbstream")
    ports_file = workdir / "ports.json"
    proc = Supervised(
        "rfbserver",
        [sys.executable, "-m", "bench.rfbserver", "--ports-file", str(ports_file)],
        workdir / "rfbserver.log",
        cwd=REPO_ROOT,
    )
    deadline = time.monotonic() + 15
    while not ports_file.exists() and time.monotonic() < deadline and not proc.exited():
        time.sleep(0.05)
    assert ports_file.exists(), proc.log_tail()
    yield json.loads(ports_file.read_text())
    proc.stop()


def server_stats(control_port: int) -> dict:
    with socket.create_connection(("127.0.0.1", control_port), timeout=5) as s:
        s.sendall(b"stats\n")
        data = b""
        while not data.endswith(b"\n"):
            data += s.recv(65536)
    return json.loads(data)


def slow_session(port: int, token: str, control_port: int, cpvm_pid: int) -> dict:
    """Runs in a thread: the slow browser, reading READ_RATE bytes per second."""
    ws = RawWebSocket("127.0.0.1", port, f"/websockify?token={token}", rcvbuf=64 * 1024)
    try:
        ws.rfb_handshake()
        rss_before = process_rss_kib(cpvm_pid)
        ws.send(struct.pack("!BBHHHH", 3, 0, 0, 0, 1024, 768))  # the server starts streaming
        consumed = 0
        peak_rss = rss_before
        start = time.monotonic()
        while time.monotonic() - start < DURATION:
            consumed += ws.recv_raw(READ_RATE // 10)
            peak_rss = max(peak_rss, process_rss_kib(cpvm_pid))
            time.sleep(0.1)
        stats = server_stats(control_port)
        # A key typed by the slow browser still reaches the VNC server.
        ws.send(struct.pack("!BBxxI", 4, 1, 0x61))
        deadline = time.monotonic() + 10
        keys = stats["keys"]
        while time.monotonic() < deadline and keys == stats["keys"]:
            ws.recv_raw(READ_RATE // 10)
            time.sleep(0.05)
            keys = server_stats(control_port)["keys"]
        return {
            "rss_before": rss_before,
            "peak_rss": peak_rss,
            "consumed": consumed,
            "sent": stats["bytes_sent"],
            "keys_before": stats["keys"],
            "keys_after": keys,
        }
    finally:
        ws.close()


@pytest_twisted.ensureDeferred
async def test_slow_reader_bounds_memory_and_input_still_flows(cpvm, manager, stream_server):
    token, _ = manager.issue({"host": "127.0.0.1", "port": stream_server["stream"]})
    r = await threads.deferToThread(
        slow_session, cpvm.port, token, stream_server["control"], cpvm.pid
    )
    print("slow reader:", r)
    # The reader really was slow, and the server was held back to its pace.
    assert r["consumed"] <= READ_RATE * (DURATION + 2)
    assert r["sent"] - r["consumed"] < MAX_IN_FLIGHT, r
    assert r["peak_rss"] - r["rss_before"] < MAX_RSS_GROWTH_KIB, r
    assert r["keys_after"] == r["keys_before"] + 1, r
