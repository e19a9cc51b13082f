"""The console path through a real cpvm process to real VNC servers."""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from cpvm.common.tokens import new_token
from tests.integration import scripted_vnc
from tests.peers import QEMU_TEST_PASSWORD, XVNC_TEST_PASSWORD
from tests.wsclient import RfbRefused, open_console

FBUR_FULL = lambda w, h: struct.pack("!BBHHHH", 3, 0, 0, 0, w, h)  # noqa: E731


def ws_url(cpvm, token, extra=None):
    url = f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}"
    if extra is not None:
        url += f"&extra={extra}"
    return url


async def read_framebuffer_update(client, width, height, bpp=4):
    """Read one FramebufferUpdate (raw encoding assumed after SetEncodings raw)."""
    head = await client.read(4)
    assert head[0] == 0, f"expected FramebufferUpdate, got message type {head[0]}"
    (count,) = struct.unpack("!H", head[2:4])
    pixels = 0
    for _ in range(count):
        x, y, w, h, enc = struct.unpack("!HHHHi", await client.read(12))
        assert enc == 0
        await client.read(w * h * bpp)
        pixels += w * h
    return pixels


async def open_session(cpvm, manager, vnc, **issue):
    token, issued = manager.issue(vnc, **issue)
    client = await open_console(ws_url(cpvm, token, issue.get("extra")))
    info = await client.rfb_handshake()
    return client, info, issued


async def full_update(client, info):
    # Raw encoding only, so the byte count of the answer is predictable.
    client.send(struct.pack("!BBHi", 2, 0, 1, 0))
    client.send(FBUR_FULL(info["width"], info["height"]))
    return await read_framebuffer_update(client, info["width"], info["height"])


async def sleep(seconds):
    await task.deferLater(reactor, seconds, lambda: None)


# -- real VNC servers --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_qemu_vnc_password(cpvm, manager, qemu_vnc):
    client, info, issued = await open_session(
        cpvm,
        manager,
        {"host": "127.0.0.1", "port": qemu_vnc.port, "password": QEMU_TEST_PASSWORD},
        vm_name="qemu-demo",
    )
    assert info["name"] == b"qemu-demo"  # desktop name replaced by the VM's name
    assert (info["width"], info["height"]) in ((720, 400), (640, 480))
    # SeaBIOS switches modes while booting: the update may be smaller than the ServerInit.
    assert await full_update(client, info) > 0
    assert manager.redeem_requests[-1]["client_address"] == "127.0.0.1"
    client.sendClose(1000)
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_xvnc_vnc_auth(cpvm, manager, xvnc):
    client, info, _ = await open_session(
        cpvm, manager, {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD}
    )
    assert (info["width"], info["height"]) == (1024, 768)
    assert await full_update(client, info) == 1024 * 768
    client.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_xvnc_vencrypt_x509vnc(cpvm, manager, xvnc_x509, pki):
    client, info, _ = await open_session(
        cpvm,
        manager,
        {
            "host": "127.0.0.1",
            "port": xvnc_x509.port,
            "password": XVNC_TEST_PASSWORD,
            "tls": "x509",
            "ca_pem": pki.ca_cert_pem.decode(),
        },
    )
    assert await full_update(client, info) == info["width"] * info["height"]
    client.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_qemu_vencrypt_x509vnc(cpvm, manager, qemu_vnc_tls, pki):
    client, info, _ = await open_session(
        cpvm,
        manager,
        {
            "host": "127.0.0.1",
            "port": qemu_vnc_tls.port,
            "password": QEMU_TEST_PASSWORD,
            "tls": "x509",
            "ca_pem": pki.ca_cert_pem.decode(),
        },
    )
    assert await full_update(client, info) > 0
    client.sendClose(1000)


@pytest_twisted.ensureDeferred
async def test_vencrypt_with_an_unknown_ca_is_refused(cpvm, manager, xvnc_x509, pki, tmp_path):
    other = pki.other_ca(tmp_path / "other")
    token, _ = manager.issue(
        {
            "host": "127.0.0.1",
            "port": xvnc_x509.port,
            "password": XVNC_TEST_PASSWORD,
            "tls": "x509",
            "ca_pem": other.ca_cert_pem.decode(),
        }
    )
    client = await open_console(ws_url(cpvm, token))
    with pytest.raises((RfbRefused, ConnectionError)):
        await client.rfb_handshake()
    closed = await client.wait_closed()
    assert closed.code in (4012, 4013)


@pytest_twisted.ensureDeferred
async def test_plain_server_refused_when_tls_required(cpvm, manager, xvnc):
    token, _ = manager.issue(
        {"host": "127.0.0.1", "port": xvnc.port, "password": XVNC_TEST_PASSWORD, "tls": "x509"}
    )
    client = await open_console(ws_url(cpvm, token))
    with pytest.raises(RfbRefused, match="VNC authentication failed"):
        await client.rfb_handshake()
    assert (await client.wait_closed()).code == 4012


# -- transparency ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bytes_flow_both_ways_unchanged(cpvm_factory, manager):
    port, factory, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    # Messages up to 300 kB: above the default limit (noVNC's are at most 10 KiB).
    cpvm = cpvm_factory(session={"max_message_size": 512 * 1024})
    try:
        client, info, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": port})
        assert info["name"] == b"test-vm"
        payload = os.urandom(3 * 1024 * 1024)
        # ClientCutText-framed chunks of many sizes, as a browser would split them.
        sent = hashlib.sha256()
        offset = 0
        sizes = [1, 7, 1000, 65536, 300000]
        i = 0
        while offset < len(payload):
            chunk = payload[offset : offset + sizes[i % len(sizes)]]
            client.send(chunk)
            sent.update(chunk)
            offset += len(chunk)
            i += 1
        echoed = await client.read(len(payload), timeout=60)
        assert hashlib.sha256(echoed).hexdigest() == sent.hexdigest()
        assert factory.connections[0].received == len(payload)
        client.sendClose(1000)
        await client.wait_closed()
    finally:
        await listening.stopListening()


# -- refusals and faults, each beside a healthy session --------------------------------


@pytest.fixture
def echo_server():
    port, factory, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    yield port
    listening.stopListening()


async def assert_still_healthy(client):
    probe = os.urandom(1000)
    client.send(probe)
    assert await client.read(len(probe)) == probe


async def refused(cpvm, token, extra=None, expect_code=None, **kwargs):
    client = await open_console(ws_url(cpvm, token, extra), **kwargs)
    reason = None
    try:
        await client.rfb_handshake()
    except RfbRefused as e:
        reason = str(e)
    except ConnectionError:
        pass
    closed = await client.wait_closed()
    if expect_code is not None:
        assert closed.code == expect_code, (closed, reason)
    return closed, reason


@pytest_twisted.ensureDeferred
async def test_replayed_token_is_refused(cpvm, manager, echo_server):
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    first = await open_console(ws_url(cpvm, token))
    await first.rfb_handshake()
    closed, reason = await refused(cpvm, token, expect_code=4003)
    assert reason == "token already used"
    await assert_still_healthy(first)


@pytest_twisted.ensureDeferred
async def test_wrong_extra_is_refused_and_does_not_burn(cpvm, manager, echo_server):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server}, extra="right")
    closed, reason = await refused(cpvm, token, extra="wrong", expect_code=4004)
    assert reason == "extra token mismatch"
    client = await open_console(ws_url(cpvm, token, "right"))
    await client.rfb_handshake()
    await assert_still_healthy(client)
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_unknown_token(cpvm, manager):
    closed, reason = await refused(cpvm, new_token(), expect_code=4001)
    assert reason == "invalid token"
    assert len(manager.redeem_requests) == 1
    # Not the shape of a token: the same answer, without asking the manager.
    closed, reason = await refused(cpvm, "not-a-token", expect_code=4001)
    assert reason == "invalid token"
    assert len(manager.redeem_requests) == 1


@pytest_twisted.ensureDeferred
async def test_wrong_origin_is_refused_before_redemption(cpvm, manager, echo_server):
    token, issued = manager.issue({"host": "127.0.0.1", "port": echo_server})
    with pytest.raises(ConnectionError):
        await open_console(ws_url(cpvm, token), origin="https://evil.example")
    assert manager.redeem_requests == []
    assert not issued.used
    # The same token still works from cpvm's own origin.
    client = await open_console(ws_url(cpvm, token), origin=f"http://127.0.0.1:{cpvm.port}")
    await client.rfb_handshake()
    await assert_still_healthy(client)


@pytest_twisted.ensureDeferred
async def test_missing_token_and_wrong_path(cpvm, manager):
    # A missing or repeated token is told in RFB (cpvm/proxy/refusal.py); a wrong path
    # is not a console at all: refused before the upgrade.
    for query in ("", "?token=a&token=b"):
        client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify{query}")
        with pytest.raises(RfbRefused, match="bad request"):
            await client.rfb_handshake()
        assert (await client.wait_closed()).code == 4400
    with pytest.raises(ConnectionError):
        await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify/x?token=a")
    assert manager.redeem_requests == []


@pytest_twisted.ensureDeferred
async def test_garbage_frames(cpvm, manager, echo_server):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    # A text frame: RFB is binary only.
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    client = await open_console(ws_url(cpvm, token))
    await client.read(12)
    client.sendMessage(b"hello", isBinary=False)
    assert (await client.wait_closed()).code == 1003
    # Binary garbage instead of an RFB version.
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    client = await open_console(ws_url(cpvm, token))
    await client.read(12)
    client.send(b"GET / HTTP/1.1\r\n\r\n")
    assert (await client.wait_closed()).code == 4015
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_vnc_server_refusing_connections(cpvm, manager, echo_server):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    port, _, listening = scripted_vnc.listen(scripted_vnc.Hanging)
    await listening.stopListening()  # nothing listens there any more
    token, _ = manager.issue({"host": "127.0.0.1", "port": port})
    closed, reason = await refused(cpvm, token, expect_code=4011)
    assert reason == "VNC server unreachable"
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_vnc_server_hanging(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(vnc={"handshake_timeout": 1.5})
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    port, factory, listening = scripted_vnc.listen(scripted_vnc.Hanging)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": port})
        closed, reason = await refused(cpvm, token, expect_code=4014)
        assert reason == "VNC handshake timed out"
        await sleep(0.2)
        assert factory.connections and not factory.connections[0].transport.connected
    finally:
        await listening.stopListening()
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_vnc_server_speaking_garbage(cpvm, manager, echo_server):
    port, _, listening = scripted_vnc.listen(scripted_vnc.Garbage)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": port})
        closed, reason = await refused(cpvm, token, expect_code=4013)
        assert reason == "VNC protocol error"
    finally:
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_vnc_password(cpvm, manager, qemu_vnc, echo_server):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    token, _ = manager.issue({"host": "127.0.0.1", "port": qemu_vnc.port, "password": "Wr0ngPw-x9"})
    closed, reason = await refused(cpvm, token, expect_code=4012)
    assert reason == "VNC authentication failed"
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_manager_slow(cpvm, manager, echo_server):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    manager.delay = 5  # cpvm's manager timeout in these tests is 3 s
    closed, reason = await refused(cpvm, token, expect_code=4010)
    assert reason == "management server unreachable"
    manager.delay = 0
    await assert_still_healthy(healthy)


@pytest_twisted.ensureDeferred
async def test_manager_down(cpvm_factory, manager, echo_server, proxy_key):
    port, _, listening = scripted_vnc.listen(scripted_vnc.Hanging)
    await listening.stopListening()
    cpvm = cpvm_factory(manager={"url": f"http://127.0.0.1:{port}"})
    # A well-shaped token (a malformed one is refused without asking the manager).
    closed, reason = await refused(cpvm, new_token(), expect_code=4010)
    assert reason == "management server unreachable"


@pytest.mark.parametrize(
    "status, body",
    [
        (200, b"{not json"),
        (200, b'{"session_id": "x", "vm": {}, "vnc": {"host": "h", "port": "5900"}}'),
        (500, b"<html>oops</html>"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_manager_broken_answers(cpvm, manager, echo_server, status, body):
    healthy, _, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    manager.override = (status, body)
    closed, reason = await refused(cpvm, new_token(), expect_code=4010)
    manager.override = None
    await assert_still_healthy(healthy)


# -- timers and administrator termination ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_timeout_counts_only_browser_input(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(session={"idle_timeout": 2})
    client, info, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    # Keep sending automatic traffic (FramebufferUpdateRequests): not user input.
    keep = task.LoopingCall(lambda: client.send(FBUR_FULL(64, 48)))
    keep.start(0.3)
    try:
        closed = await client.wait_closed(timeout=10)
    finally:
        keep.stop()
    assert closed.code == 4020


@pytest_twisted.ensureDeferred
async def test_key_events_keep_a_session_alive(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(session={"idle_timeout": 1.5})
    client, info, _ = await open_session(cpvm, manager, {"host": "127.0.0.1", "port": echo_server})
    for _ in range(8):  # 3.2 s of typing, longer than the idle limit
        client.send(struct.pack("!BBxxI", 4, 1, 0x61))
        await client.read(8)
        await sleep(0.4)
    assert client.close_info is None
    closed = await client.wait_closed(timeout=10)
    assert closed.code == 4020


@pytest_twisted.ensureDeferred
async def test_session_time_limit(cpvm, manager, echo_server):
    client, _, _ = await open_session(
        cpvm, manager, {"host": "127.0.0.1", "port": echo_server}, limits={"max_duration": 1}
    )
    closed = await client.wait_closed(timeout=10)
    assert closed.code == 4021
    assert closed.reason == "session time limit reached"


@pytest_twisted.ensureDeferred
async def test_administrator_termination_via_heartbeat(cpvm, manager, echo_server):
    echo = {"host": "127.0.0.1", "port": echo_server}
    victim, _, issued = await open_session(cpvm, manager, echo)
    other, _, _ = await open_session(cpvm, manager, echo)
    manager.terminate = [issued.session_id]
    closed = await victim.wait_closed(timeout=10)
    assert closed.code == 4022
    await assert_still_healthy(other)
    for _ in range(50):
        if any(sid == issued.session_id for sid, _ in manager.ends):
            break
        await sleep(0.1)
    sid, report = next((s, r) for s, r in manager.ends if s == issued.session_id)
    assert report["reason"] == "terminated"


@pytest_twisted.ensureDeferred
async def test_session_end_is_reported_with_bytes(cpvm, manager, echo_server):
    echo = {"host": "127.0.0.1", "port": echo_server}
    client, _, issued = await open_session(cpvm, manager, echo)
    client.send(b"x" * 5000)
    await client.read(5000)
    client.sendClose(1000)
    await client.wait_closed()
    for _ in range(50):
        if manager.ends:
            break
        await sleep(0.1)
    sid, report = manager.ends[0]
    assert sid == issued.session_id
    assert report["reason"] == "client_closed"
    assert report["bytes_to_server"] == 5000  # relayed bytes; the handshake is not counted
    assert report["bytes_to_client"] >= 5000
    assert report["client_address"] == "127.0.0.1"
    heartbeat = manager.heartbeats[-1]
    assert heartbeat["public_port"] == cpvm.port or heartbeat["public_port"] == 0


@pytest.mark.parametrize("allowed", [True, False])
@pytest_twisted.ensureDeferred
async def test_vencrypt_anonymous_tls_only_when_allowed(cpvm_factory, manager, allowed):
    from tests.peers import start_xvnc

    with start_xvnc("TLSVnc", XVNC_TEST_PASSWORD) as xvnc:
        cpvm = cpvm_factory(vnc={"allow_anonymous_tls": "true" if allowed else "false"})
        token, _ = manager.issue(
            {
                "host": "127.0.0.1",
                "port": xvnc.port,
                "password": XVNC_TEST_PASSWORD,
                "tls": "anonymous",
            }
        )
        client = await open_console(ws_url(cpvm, token))
        if allowed:
            info = await client.rfb_handshake()
            assert await full_update(client, info) == info["width"] * info["height"]
            client.sendClose(1000)
        else:
            with pytest.raises(RfbRefused, match="VNC authentication failed"):
                await client.rfb_handshake()
            assert (await client.wait_closed()).code == 4012
