"""Attack: 50 MB request bodies to the real cpvm and the real manager (issue 9, finding 2).

twisted.web used to spool and parse any body before cpvm code ran. Now cpvm refuses every
body and the manager every body over ``[server] max_body_size`` with 413, from the
headers (or, chunked, as soon as the cap is passed): the daemon's memory stays flat and
nothing is written to its TMPDIR.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from tests.daemons import Daemon, cpvm_config, process_rss_kib, start_cpvm

BODY = 50 * 1024 * 1024
PIECE = 1024 * 1024
# Generous: the old code grew cpvm by ~10x the body on a form POST.
RSS_GROWTH_KIB = 20 * 1024


@pytest.fixture
def tmpdir_env(tmp_path):
    """A fresh TMPDIR for the daemon: it must stay empty."""
    d = tmp_path / "daemon-tmp"
    d.mkdir()
    return d


@pytest.fixture
def cpvm_daemon(tmp_path, tmpdir_env):
    # No manager is needed to serve HTTP; heartbeats to a closed port just fail.
    text = cpvm_config("http://127.0.0.1:9")
    (tmp_path / "cpvm").mkdir()
    daemon = start_cpvm(text, workdir=tmp_path / "cpvm", env={"TMPDIR": str(tmpdir_env)})
    yield daemon
    daemon.stop()


@pytest.fixture
def manager_daemon(tmp_path, tmpdir_env):
    work = tmp_path / "manager"
    work.mkdir()
    text = (
        f"[server]\nlisten = tcp:0:interface=127.0.0.1\ndata_dir = {work / 'data'}\n"
        "[metrics]\nenabled = false\n"
    )
    daemon = Daemon("manager", "cpvm-manager", text, workdir=work, env={"TMPDIR": str(tmpdir_env)})
    yield daemon
    daemon.stop()


def head(path: str, *, length: int | None, extra: str = "") -> bytes:
    framing = (
        f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    )
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n{framing}{extra}\r\n"
    ).encode()


def read_answer(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def answer_to_headers_alone(port: int, request_head: bytes) -> bytes:
    """Send only the head of a big request: the answer must come without any body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_head)
        return read_answer(sock)


def upload(port: int, pid: int, request_head: bytes, *, chunked: bool) -> tuple[bytes, int]:
    """Send a whole 50 MB body (as far as the server lets us), sampling the daemon's RSS;
    returns the answer and the peak RSS seen."""
    piece = b"a=" + b"x" * (PIECE - 2)
    peak = process_rss_kib(pid)
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(request_head)
            for _ in range(BODY // PIECE):
                if chunked:
                    sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                else:
                    sock.sendall(piece)
                peak = max(peak, process_rss_kib(pid))
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server closed on us: expected once it refused
        answer = read_answer(sock)
    # Let the daemon finish whatever it does with what it got.
    end = time.monotonic() + 3
    while time.monotonic() < end:
        peak = max(peak, process_rss_kib(pid))
        time.sleep(0.1)
    return answer, peak


def files_under(directory: Path, pid: int) -> list[str]:
    """Entries of ``directory`` plus the daemon's open files in it (deleted ones too:
    tempfile.TemporaryFile leaves no name behind)."""
    found = [p.name for p in directory.iterdir()]
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            found.append(target)
    return found


def assert_refused_without_cost(daemon, tmpdir_env, path, *, chunked_refused: bool):
    rss_before = process_rss_kib(daemon.pid)
    for chunked in (False, True):
        if chunked and not chunked_refused:
            continue
        answer, peak = upload(
            daemon.port, daemon.pid, head(path, length=None if chunked else BODY), chunked=chunked
        )
        assert answer.startswith(b"HTTP/1.1 413 "), (chunked, answer[:200])
        assert peak - rss_before < RSS_GROWTH_KIB, (chunked, rss_before, peak)
        assert files_under(tmpdir_env, daemon.pid) == []


def test_cpvm_refuses_any_body_from_the_headers(cpvm_daemon, tmpdir_env):
    for framing in ({"length": BODY}, {"length": 1}, {"length": None}):
        answer = answer_to_headers_alone(cpvm_daemon.port, head("/healthz", **framing))
        assert answer.startswith(b"HTTP/1.1 413 "), (framing, answer[:200])
        assert answer.endswith(b"request body too large\n")
    # Without a body the same path answers as before.
    answer = answer_to_headers_alone(
        cpvm_daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"ok\n")


def test_cpvm_50mb_bodies_cost_no_memory_and_no_files(cpvm_daemon, tmpdir_env):
    assert_refused_without_cost(cpvm_daemon, tmpdir_env, "/healthz", chunked_refused=True)
    assert "request body too large" in cpvm_daemon.log_text()
    answer = answer_to_headers_alone(
        cpvm_daemon.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_manager_refuses_a_big_content_length_from_the_headers(manager_daemon):
    answer = answer_to_headers_alone(manager_daemon.port, head("/client/api", length=BODY))
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    # At the cap is fine: the API answers (here: a missing command) instead of 413.
    body = b"response=json&x=" + b"y" * (1024 * 1024 - 16)
    assert len(body) == 1024 * 1024
    with socket.create_connection(("127.0.0.1", manager_daemon.port), timeout=10) as sock:
        sock.sendall(head("/client/api", length=len(body), extra="Connection: close\r\n") + body)
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 4") and not answer.startswith(b"HTTP/1.1 413 "), answer[
        :300
    ]


def test_manager_small_chunked_body_still_served(manager_daemon):
    body = b'{"public_host": "x"}'
    with socket.create_connection(("127.0.0.1", manager_daemon.port), timeout=10) as sock:
        sock.sendall(
            b"POST /proxy/v1/heartbeat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(body)
            + body
            + b"\r\n0\r\n\r\n"
        )
        answer = read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:300]  # no proxy key: not 413


def test_manager_50mb_bodies_cost_no_memory_and_no_files(manager_daemon, tmpdir_env):
    assert_refused_without_cost(manager_daemon, tmpdir_env, "/client/api", chunked_refused=True)
    assert "request body too large" in manager_daemon.log_text()
