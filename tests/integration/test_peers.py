"""The real test peers of tests/peers/ do what the integration tests rely on: each starts,
offers the RFB security types it was asked for, accepts the test password and no other,
sends its ServerInit (size and name as configured), speaks SQL, and is gone after stop()."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cpvm.rfb.vncauth import vnc_auth_response
from tests import peers


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _security_types(sock: socket.socket) -> list[int]:
    """Do the 3.8 version exchange and return the offered security types."""
    assert _recv_exactly(sock, 12) == b"RFB 003.008\n"
    sock.sendall(b"RFB 003.008\n")
    count = _recv_exactly(sock, 1)[0]
    assert count > 0, "server refused the connection"
    return list(_recv_exactly(sock, count))


def _vencrypt_subtypes(sock: socket.socket) -> list[int]:
    """Pick VeNCrypt (19), agree on version 0.2 and return the offered subtypes."""
    sock.sendall(bytes([19]))
    assert _recv_exactly(sock, 2) == b"\x00\x02"
    sock.sendall(b"\x00\x02")
    assert _recv_exactly(sock, 1) == b"\x00", "server rejected VeNCrypt 0.2"
    count = _recv_exactly(sock, 1)[0]
    return list(struct.unpack(f">{count}I", _recv_exactly(sock, 4 * count)))


def _security_result(sock: socket.socket) -> tuple[int, bytes]:
    """The SecurityResult (0: OK) and, on failure, the server's reason (RFB 3.8)."""
    (result,) = struct.unpack(">I", _recv_exactly(sock, 4))
    if result == 0:
        return 0, b""
    (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
    return result, _recv_exactly(sock, length)


def _vnc_auth(peer: peers.Peer, password: str) -> tuple[int, bytes, socket.socket]:
    """VNC Authentication (type 2) with ``password``: (result, reason, the open socket)."""
    sock = socket.create_connection((peer.host, peer.port), timeout=10)
    assert 2 in _security_types(sock)
    sock.sendall(bytes([2]))
    challenge = _recv_exactly(sock, 16)
    sock.sendall(vnc_auth_response(password.encode(), challenge))
    return (*_security_result(sock), sock)


def _server_init(sock: socket.socket) -> tuple[int, int, bytes]:
    """Send a shared ClientInit; the ServerInit's width, height and desktop name."""
    sock.sendall(b"\x01")
    width, height = struct.unpack(">HH", _recv_exactly(sock, 4))
    _recv_exactly(sock, 16)  # pixel format
    (length,) = struct.unpack(">I", _recv_exactly(sock, 4))
    return width, height, _recv_exactly(sock, length)


def _assert_password_is_checked(peer: peers.Peer, password: str) -> tuple[int, int, bytes]:
    """The wrong password is refused, the right one accepted; returns the ServerInit."""
    result, reason, sock = _vnc_auth(peer, "wrong-" + password)
    sock.close()
    assert result == 1 and reason, reason
    result, reason, sock = _vnc_auth(peer, password)
    with sock:
        assert (result, reason) == (0, b"")
        return _server_init(sock)


def _x509vnc_tls(port: int, cafile: Path) -> ssl.SSLSocket:
    """Negotiate VeNCrypt X509Vnc and complete TLS, verifying the server against *cafile*."""
    sock = socket.create_connection((peers.HOST, port), timeout=10)
    assert 19 in _security_types(sock)
    assert 261 in _vencrypt_subtypes(sock)
    sock.sendall(struct.pack(">I", 261))
    assert _recv_exactly(sock, 1) == b"\x01"
    context = ssl.create_default_context(cafile=str(cafile))
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _probe_types(peer: peers.Peer) -> list[int]:
    with socket.create_connection((peer.host, peer.port), timeout=10) as sock:
        return _security_types(sock)


def _assert_stopped(peer: peers.Peer) -> None:
    peer.stop()
    assert not peer.alive()
    assert not Path(f"/proc/{peer.pid}").exists() or _is_zombie(peer.pid)
    assert not peer.workdir.exists()
    with pytest.raises(OSError):
        socket.create_connection((peer.host, peer.port), timeout=1).close()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def test_free_port_is_bindable() -> None:
    port = peers.free_port()
    with socket.socket() as sock:
        sock.bind((peers.HOST, port))


def test_missing_binary_says_to_run_install_deps() -> None:
    with pytest.raises(peers.PeerUnavailable, match="scripts/install-deps"):
        peers.require_binary("cpvm-no-such-binary")


@contextlib.contextmanager
def _serving(answer: bytes | None) -> Iterator[int]:
    """A listener on 127.0.0.1 (its port) sending every client ``answer`` (None: nothing
    at all) and holding the connection open until the block ends."""
    listener = socket.create_server((peers.HOST, 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            held.append(conn)
            if answer is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)
        for conn in held:
            conn.close()


def test_wait_for_rfb_banner_returns_the_banner() -> None:
    with _serving(b"RFB 003.008\n") as port:
        assert peers.wait_for_rfb_banner(peers.HOST, port, timeout=10) == b"RFB 003.008\n"


@pytest.mark.parametrize(
    "answer, why",
    [
        (None, "timed out"),  # accepts, says nothing
        (b"HTTP/1.1 400 Bad\r\n", "unexpected banner"),  # something else on the port
    ],
)
def test_wait_for_rfb_banner_gives_up_with_the_reason(answer, why) -> None:
    with _serving(answer) as port:
        with pytest.raises(
            peers.PeerStartError,
            match=f"no RFB banner on 127.0.0.1:{port} "
            rf"within 0.5s \(last: .*{why}",
        ):
            peers.wait_for_rfb_banner(peers.HOST, port, timeout=0.5)


def test_wait_for_rfb_banner_on_a_closed_port_is_bounded() -> None:
    port = peers.free_port()  # nobody listens there
    with pytest.raises(peers.PeerStartError, match="refused"):
        peers.wait_for_rfb_banner(peers.HOST, port, timeout=0.5)


def test_qemu_with_password_offers_vnc_auth(qemu_vnc: peers.QemuVnc) -> None:
    assert qemu_vnc.host == "127.0.0.1"
    assert qemu_vnc.port == 5900 + qemu_vnc.display
    assert _probe_types(qemu_vnc) == [2]
    # The password travels in a 0600 file, never on the command line.
    cmdline = Path(f"/proc/{qemu_vnc.pid}/cmdline").read_bytes()
    assert b"qemu-system-x86_64" in cmdline
    assert peers.QEMU_TEST_PASSWORD.encode() not in cmdline
    assert "7.2" in qemu_vnc.monitor("info version")
    width, height, name = _assert_password_is_checked(qemu_vnc, peers.QEMU_TEST_PASSWORD)
    assert width > 0 and height > 0 and name == b"QEMU"
    _assert_stopped(qemu_vnc)


def test_qemu_with_tls_offers_vencrypt_x509vnc(
    qemu_vnc_tls: peers.QemuVnc, pki: peers.TestPki
) -> None:
    with socket.create_connection((qemu_vnc_tls.host, qemu_vnc_tls.port), timeout=10) as sock:
        assert _security_types(sock) == [19]
        assert _vencrypt_subtypes(sock) == [261]
    with _x509vnc_tls(qemu_vnc_tls.port, pki.ca_cert) as tls:
        assert len(_recv_exactly(tls, 16)) == 16  # the VNC Authentication challenge


def test_qemu_without_password_offers_none() -> None:
    with peers.start_qemu(None) as qemu:
        with socket.create_connection((qemu.host, qemu.port), timeout=10) as sock:
            assert _security_types(sock) == [1]
            sock.sendall(b"\x01")
            assert _security_result(sock) == (0, b"")
            assert _server_init(sock)[2] == b"QEMU"
    assert not qemu.alive()


def test_xvnc_vncauth_offers_vnc_auth(xvnc: peers.Xvnc) -> None:
    assert xvnc.host == "127.0.0.1"
    assert _probe_types(xvnc) == [2]
    # As start_xvnc was asked: -geometry 1024x768, -desktop cpvm-test.
    assert _assert_password_is_checked(xvnc, peers.XVNC_TEST_PASSWORD) == (1024, 768, b"cpvm-test")
    assert Path(f"/tmp/.X11-unix/X{xvnc.display}").exists()
    xterm = xvnc.run_xterm()
    assert xterm.poll() is None
    xvnc.stop()
    assert xterm.poll() is not None, "the X client must be stopped with its server"
    _assert_stopped(xvnc)


def test_xvnc_x509vnc_offers_vencrypt_261(xvnc_x509: peers.Xvnc, pki: peers.TestPki) -> None:
    with socket.create_connection((xvnc_x509.host, xvnc_x509.port), timeout=10) as sock:
        assert _security_types(sock) == [19]
        assert _vencrypt_subtypes(sock) == [261]
    with _x509vnc_tls(xvnc_x509.port, pki.ca_cert) as tls:
        assert len(_recv_exactly(tls, 16)) == 16


def test_xvnc_lists_vencrypt_once_per_configured_type(pki: peers.TestPki) -> None:
    # A TigerVNC quirk worth knowing: "VeNCrypt" in -SecurityTypes is itself type 19, so
    # "VeNCrypt,X509Vnc" offers [19, 19]; a client must cope with repeated types.
    with peers.start_xvnc(
        "VeNCrypt,X509Vnc,TLSVnc,VncAuth", x509=(pki.server_cert, pki.server_key)
    ) as server:
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            assert _security_types(sock) == [19, 19, 2]
            assert _vencrypt_subtypes(sock) == [261, 258, 2]


def test_pki_other_ca_is_rejected_and_reissued_leaf_accepted(
    pki: peers.TestPki, tmp_path: Path
) -> None:
    other = pki.other_ca(tmp_path / "other")
    rotated = pki.issue_server_cert(tmp_path / "rotated")
    assert rotated.server_cert.read_bytes() != pki.server_cert.read_bytes()
    assert oct(os.stat(rotated.server_key).st_mode & 0o777) == "0o600"
    with peers.start_xvnc("X509Vnc", x509=(rotated.server_cert, rotated.server_key)) as server:
        with _x509vnc_tls(server.port, pki.ca_cert) as tls:
            assert tls.version() is not None
        with pytest.raises(ssl.SSLCertVerificationError):
            _x509vnc_tls(server.port, other.ca_cert)


def test_postgres_answers_select_1(postgres: peers.Postgres) -> None:
    import psycopg2

    assert postgres.host == "127.0.0.1"
    with psycopg2.connect(postgres.dsn, connect_timeout=10) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT 1, current_database()")
            assert cur.fetchone() == (1, "cpvm_test")
    conn.close()
    other_dsn = postgres.create_database("cpvm_test_smoke")
    conn = psycopg2.connect(other_dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT current_database(), count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            assert cur.fetchone() == ("cpvm_test_smoke", 0)  # a new, empty database
    finally:
        conn.close()
    # The server is the process the peer started, listening where it says.
    assert peers.pid_listens_on(postgres.pid, postgres.port)


def test_demo_guest_kernel_boots(demo_guest: tuple[Path, Path], tmp_path: Path) -> None:
    serial_log = tmp_path / "serial.log"
    with peers.start_qemu(
        None, guest=demo_guest, serial_log=serial_log, append="console=ttyS0"
    ) as qemu:
        log = qemu.wait_for_serial("Linux version", timeout=30)
        assert "Linux version" in log
        log = qemu.wait_for_serial(peers.GUEST_READY_MARKER, timeout=45)
        assert log.index("Linux version") < log.index(peers.GUEST_READY_MARKER)


def test_demo_guest_shell_gets_typed_keys(qemu_guest: peers.QemuVnc) -> None:
    # The contract the end-to-end tests rely on, checked here with QEMU's own keyboard:
    # keys typed on the VGA console reach the shell, and ttyS0 lands in the serial log.
    qemu_guest.wait_for_serial(peers.GUEST_READY_MARKER, timeout=45)
    keys = "e c h o spc a b c 1 2 3 spc shift-dot slash d e v slash t t y shift-s 0 ret"
    for key in keys.split():
        qemu_guest.monitor(f"sendkey {key}")
    assert "abc123" in qemu_guest.wait_for_serial("abc123", timeout=15)


def test_chromium_launches_headless() -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = peers.launch_chromium(playwright)
        try:
            page = browser.new_page()
            page.goto("data:text/html,<title>t</title><p id=x>cpvm</p>")
            assert page.inner_text("#x") == "cpvm"
        finally:
            browser.close()
