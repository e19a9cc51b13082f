"""Attack: slow-loris connections against a real cpvm (issue 9, finding 4).

Twisted's HTTP idle timeout restarts with every byte, so one byte every few seconds kept a
connection open for as long as the client liked, and nothing capped such connections. Now
every request has an absolute deadline from the TCP accept, and connections that have not
upgraded are capped per TCP peer address: one address at its cap cannot keep another one
from opening a console.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest_twisted
from twisted.internet import threads

from tests.daemons import Daemon
from tests.peers import XVNC_TEST_PASSWORD
from tests.wsclient import open_console

DEADLINE = 6.0
PER_ADDRESS = 5
ATTACKER = "127.0.0.2"


class Trickler(threading.Thread):
    """Sends an upgrade request one byte every 0.5 s from ``source``; notes when (and
    with what) the server closed the connection."""

    def __init__(self, port: int, source: str):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        self.opened = time.monotonic()
        self.closed_after: float | None = None
        self.answer = b""
        self.stop = threading.Event()

    def run(self) -> None:
        request = b"GET /websockify?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1000
        self.sock.settimeout(0.5)
        try:
            for byte in request:
                if self.stop.is_set():
                    return
                self.sock.send(bytes([byte]))
                try:
                    data = self.sock.recv(1000)
                except TimeoutError:
                    continue
                if not data:
                    break
                self.answer += data
        except OSError:
            pass
        finally:
            self.closed_after = time.monotonic() - self.opened
            self.sock.close()


def closed_at_once(port: int, source: str) -> bool:
    """A new connection from ``source`` is closed by the server without waiting for a
    request (EOF or reset within 3 s, no answer)."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.settimeout(3)
        try:
            return s.recv(100) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def wait_all_closed(tricklers: list[Trickler], bound: float) -> None:
    end = time.monotonic() + bound
    for t in tricklers:
        t.join(max(0.0, end - time.monotonic()))


@pytest_twisted.ensureDeferred
async def test_trickling_connections_are_closed_at_the_deadline(cpvm_factory, manager):
    cpvm = cpvm_factory(session={"websocket_handshake_timeout": DEADLINE})
    tricklers = [Trickler(cpvm.port, ATTACKER) for _ in range(3)]
    for t in tricklers:
        t.start()
    await threads.deferToThread(wait_all_closed, tricklers, DEADLINE + 10)
    for t in tricklers:
        # Still trickling (one byte per 0.5 s) when the deadline came: closed with a 408.
        assert t.closed_after is not None, "a trickling connection outlived the deadline"
        assert DEADLINE - 0.5 <= t.closed_after < DEADLINE + 5, t.closed_after
        assert t.answer.startswith(b"HTTP/1.1 408 "), t.answer


@pytest_twisted.ensureDeferred
async def test_one_address_at_its_cap_does_not_lock_out_another(cpvm_factory, manager, xvnc):
    cpvm = cpvm_factory(
        session={"websocket_handshake_timeout": DEADLINE},
        server={"max_http_connections_per_address": PER_ADDRESS},
    )
    tricklers = [Trickler(cpvm.port, ATTACKER) for _ in range(PER_ADDRESS)]
    for t in tricklers:
        t.start()
    try:
        # The attacker's next connection is closed at once ...
        assert await threads.deferToThread(closed_at_once, cpvm.port, ATTACKER)
        # ... while a person at another address opens a console on a real VNC server.
        token, _ = manager.issue(
            {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
        )
        client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
        info = await client.rfb_handshake()
        assert (info["width"], info["height"]) == (1024, 768)
        # The attacker's connections were all still open (at the cap) meanwhile.
        assert all(t.closed_after is None for t in tricklers)
        client.sendClose(1000)
        await client.wait_closed()
    finally:
        for t in tricklers:
            t.stop.set()
        await threads.deferToThread(wait_all_closed, tricklers, DEADLINE + 10)
    assert "per-address connection limit reached" in cpvm.log_text()


def test_manager_trickling_request_closed_at_its_deadline(tmp_path):
    work = tmp_path / "manager"
    work.mkdir()
    manager = Daemon(
        "manager",
        "cpvm-manager",
        f"[server]\nlisten = tcp:0:interface=127.0.0.1\ndata_dir = {work / 'data'}\n"
        "request_timeout = 3\n",
        workdir=work,
    )
    try:
        trickler = Trickler(manager.port, "127.0.0.1")
        trickler.start()
        trickler.join(3 + 10)
        assert trickler.closed_after is not None, "a trickling request outlived the deadline"
        assert 2.5 <= trickler.closed_after < 3 + 5, trickler.closed_after
        assert trickler.answer.startswith(b"HTTP/1.1 408 "), trickler.answer
    finally:
        manager.stop()
