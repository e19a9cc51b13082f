"""Attack: a flood of bogus console WebSockets against the real daemons (issue 9, finding 5).

Before, every upgrade with a made-up token cost the manager a redemption (a write
transaction) and held one of cpvm's ``max_sessions`` slots until refused, so one address
could lock everyone out. Now cpvm refuses a token of the wrong shape itself, and an
address whose redemptions keep failing runs out of attempts (close code 4029) without the
manager hearing of it, while a person elsewhere opens a console as usual.

Real ``twistd cpvm-manager`` (SQLite, set up with cpvm-manager-admin), real ``twistd
cpvm`` and a real Xvnc.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import socket
import struct
import threading
import time

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task, threads

from tests.daemons import Daemon, cpvm_config, start_cpvm
from tests.manager.harness import Manager, write_config
from tests.peers import XVNC_TEST_PASSWORD, free_port
from tests.wsclient import open_console

ATTACKER = "127.0.0.2"
FLOOD_SECONDS = 4.0
# A small proxy: before, 40 bogus sessions waiting to be refused filled it.
MAX_SESSIONS = 30
# cpvm's defaults: [session] failed_redemption_burst = 20, failed_redemption_rate = 0.5.
BURST, RATE = 20, 0.5


@pytest.fixture
def stack(tmp_path, xvnc):
    """Manager and cpvm daemons; an account whose VM is the Xvnc."""
    mdir = tmp_path / "manager"
    mdir.mkdir()
    config_path = write_config(mdir, {})
    admin = Manager(None, config_path, 0, mdir)  # type: ignore[arg-type]  # admin CLI only
    creds = admin.account("alice")
    vm = admin.vm(
        "alice",
        name="flooded",
        password=XVNC_TEST_PASSWORD,
        vnc_host="127.0.0.1",
        vnc_port=str(xvnc.port),
        tls="none",
    )
    key_file = tmp_path / "proxy.key"
    key_file.write_text(admin.proxy_key("cpvm-1") + "\n")
    key_file.chmod(0o600)
    manager = Daemon("manager", "cpvm-manager", config_path.read_text(), workdir=mdir)
    admin.port = manager.port
    (tmp_path / "cpvm").mkdir()
    # The manager refuses heartbeats announcing port 0: a fixed port it can put in URLs.
    port = free_port()
    cpvm = start_cpvm(
        cpvm_config(
            manager.url(),
            credential_file=key_file,
            server={"port": port, "public_port": port},
            session={"max_sessions": MAX_SESSIONS},
        ),
        workdir=tmp_path / "cpvm",
    )
    yield admin, creds, vm, manager, cpvm
    cpvm.stop()
    manager.stop()


def bogus_attempt(port: int, polite: bool) -> tuple[int | None, str]:
    """One WebSocket from the attacker with a well-shaped, made-up token; answers the
    close code and reason (or the HTTP status line's code) cpvm sent. ``polite``: say
    the RFB version at once, as noVNC does (else the refusal waits for it, 2 s)."""
    with socket.socket() as s:
        s.bind((ATTACKER, 0))
        s.settimeout(10)
        s.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                f"GET /websockify?token={secrets.token_urlsafe(32)} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return None, "closed"
                data += chunk
            status = int(data.split(b" ", 2)[1])
            if status != 101:
                return status, "http"
            if polite:
                mask = os.urandom(4)
                version = b"RFB 003.008\n"
                s.sendall(
                    bytes([0x82, 0x80 | len(version)])
                    + mask
                    + bytes(b ^ mask[i % 4] for i, b in enumerate(version))
                )
            rest = data.split(b"\r\n\r\n", 1)[1]
            while True:
                code = close_code(rest)
                if code is not None:
                    return code
                chunk = s.recv(4096)
                if not chunk:
                    return None, "closed"
                rest += chunk
        except OSError as e:
            return None, type(e).__name__


def close_code(frames: bytes) -> tuple[int, str] | None:
    """The close frame's code and reason if ``frames`` (server frames) hold one."""
    pos = 0
    while len(frames) - pos >= 2:
        b0, b1 = frames[pos], frames[pos + 1] & 0x7F
        head = 2
        if b1 == 126:
            if len(frames) - pos < 4:
                return None
            b1, head = struct.unpack("!H", frames[pos + 2 : pos + 4])[0], 4
        if len(frames) - pos < head + b1:
            return None
        payload = frames[pos + head : pos + head + b1]
        if b0 & 0x0F == 0x8:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        pos += head + b1
    return None


class Flood:
    """``threads`` threads of back-to-back bogus attempts until stopped."""

    def __init__(self, port: int, threads: int, polite: bool):
        self.port = port
        self.polite = polite
        self.threads = threads
        self.results: list[tuple[int | None, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(bogus_attempt(self.port, self.polite))

    def start(self) -> None:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> float:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return time.monotonic() - self.started


async def redeem_calls(manager) -> float:
    """Redemption requests the manager received, from its own /metrics."""
    response = await treq.get(manager.url("/metrics"))
    text = await response.text()
    found = re.findall(
        r'^cpvm_manager_proxy_requests_total\{endpoint="redeem",status="\d+"\} (\S+)$', text, re.M
    )
    return sum(float(v) for v in found)


@pytest.mark.parametrize(
    "threads, polite", [(8, True), (40, False)], ids=["fast-refusals", "sessions-held-open"]
)
@pytest_twisted.ensureDeferred
async def test_bogus_flood_from_one_address_neither_locks_out_nor_reaches_the_manager(
    stack, threads, polite
):
    admin, creds, vm, manager, cpvm = stack
    await _until_ready(cpvm)
    before = await redeem_calls(manager)
    flood = Flood(cpvm.port, threads, polite)
    flood.start()
    try:
        await _sleep(1.0)  # the flood is in full swing
        # A person at another address opens a console, through the signed API, that works.
        answer = await admin.endpoint(creds, vm)
        assert answer["success"], answer
        token = answer["websocket"]["token"]
        client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
        info = await client.rfb_handshake()
        assert info["name"] == b"flooded" and (info["width"], info["height"]) == (1024, 768)
        client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, 16, 16))
        assert (await client.read(4))[0] == 0  # a FramebufferUpdate from Xvnc
        await _sleep(max(0.0, FLOOD_SECONDS - (time.monotonic() - flood.started)))
    finally:
        elapsed = await _in_thread(flood.stop)
    client.sendClose(1000)
    await client.wait_closed()
    calls = await redeem_calls(manager) - before - 1  # minus the person's redemption
    limited = [
        r
        for r in flood.results
        if r == (4029, "too many failed console attempts from this address")
    ]
    allowed = BURST + RATE * (elapsed + 1)
    assert len(flood.results) > 2 * allowed, "the flood was too small to prove anything"
    assert calls <= allowed, (calls, elapsed, len(flood.results))
    assert len(limited) >= len(flood.results) - allowed - threads, sorted(set(flood.results))
    assert "rate_limited" in cpvm.log_text()
    assert token not in cpvm.log_text() and token not in manager.log_text()


async def _until_ready(cpvm) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            response = await treq.get(cpvm.url("/readyz"), persistent=False)
            if response.code == 200:
                return
        except Exception:
            pass
        await _sleep(0.2)
    raise AssertionError("cpvm did not become ready (manager heartbeat)")


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def _in_thread(fn):
    return await threads.deferToThread(fn)


@pytest_twisted.ensureDeferred
async def test_pending_redemptions_have_their_own_cap(cpvm_factory, manager, xvnc):
    """With the manager slow, ``max_pending`` upgrades wait for it; one more gets 503
    at once; when the manager answers, the waiting consoles work and there is room again."""
    cpvm = cpvm_factory(session={"max_pending": 2})
    vnc = {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
    manager.delay = 1.5  # below cpvm's manager timeout (3 s in these tests)
    waiting = []
    for _ in range(2):
        token, _ = manager.issue(vnc)
        waiting.append(await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}"))
    token, issued = manager.issue(vnc)
    with pytest.raises(ConnectionError, match="503.*too many consoles being opened"):
        await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
    assert not issued.used  # refused before any redemption
    for client in waiting:
        info = await client.rfb_handshake()
        assert (info["width"], info["height"]) == (1024, 768)
    manager.delay = 0
    client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
    await client.rfb_handshake()
    for c in [*waiting, client]:
        c.sendClose(1000)
        await c.wait_closed()
