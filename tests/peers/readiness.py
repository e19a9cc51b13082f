"""Is the peer up, and is it ours? Free ports, bounded polls for an RFB banner or a line
in a file, the owner of a listening socket, and a retry when another process took the
port between choosing it and the peer binding it."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from pathlib import Path

from tests.peers.processes import HOST, PeerStartError, Supervised, deadline

_START_ATTEMPTS = 5  # a free port can be taken between choosing it and the peer binding it


def free_port(host: str = HOST) -> int:
    """Return a TCP port on *host* that was free a moment ago (bind to port 0, read, close).

    Racy by nature: the start helpers retry with another port when the peer cannot bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_rfb_banner(
    host: str, port: int, timeout: float = 10.0, *, process: "Supervised | None" = None
) -> bytes:
    """Poll (bounded by *timeout* seconds) until ``host:port`` answers with an RFB banner.

    Connects, reads the 12-byte ``RFB 00x.00y\\n`` and closes; returns the banner. If
    *process* is given and exits first, raises :class:`PeerStartError` at once.
    """
    end = deadline(timeout)
    last_error: object = None
    while True:
        if process is not None and process.exited():
            raise PeerStartError(
                f"{process.name} exited (status {process.returncode()}) before its RFB banner "
                f"on {host}:{port}\n{process.log_tail()}"
            )
        remaining = end - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection((host, port), timeout=min(1.0, remaining)) as sock:
                banner = b""
                while len(banner) < 12:
                    chunk = sock.recv(12 - len(banner))
                    if not chunk:
                        break
                    banner += chunk
            if re.fullmatch(rb"RFB \d{3}\.\d{3}\n", banner):
                return banner
            last_error = f"unexpected banner {banner!r}"
        except OSError as exc:
            last_error = exc
        time.sleep(0.02)  # poll interval, not a readiness guess
    detail = f"\n{process.log_tail()}" if process is not None else ""
    raise PeerStartError(
        f"no RFB banner on {host}:{port} within {timeout:g}s (last: {last_error}){detail}"
    )


def wait_for_file_text(path: Path, text: str, timeout: float) -> str:
    """Poll (bounded) until file *path* contains *text*; return the file's content.

    Meant for QEMU ``-serial file:...`` logs. Raises :class:`TimeoutError` with the tail.
    """
    end = deadline(timeout)
    content = ""
    while True:
        with contextlib.suppress(FileNotFoundError):
            content = Path(path).read_text(errors="replace")
        if text in content:
            return content
        if time.monotonic() >= end:
            raise TimeoutError(
                f"{text!r} not in {path} within {timeout:g}s; last 1000 chars:\n{content[-1000:]}"
            )
        time.sleep(0.05)


def _listener_inodes(port: int) -> set[str]:
    """Socket inodes of TCP listeners on *port* (IPv4 and IPv6), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            with open(table) as fh:
                next(fh)
                for line in fh:
                    fields = line.split()
                    local, state, inode = fields[1], fields[3], fields[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
    return inodes


def pid_listens_on(pid: int, port: int) -> bool:
    """True when process *pid* holds a listening socket on *port* (not some other process)."""
    wanted = {f"socket:[{inode}]" for inode in _listener_inodes(port)}
    if not wanted:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
    return False


def port_in_use_failure(proc: Supervised) -> bool:
    """Whether a peer that failed to start did so (probably) because its port was taken."""
    log = proc.log_tail().lower()
    return any(
        hint in log
        for hint in ("address already in use", "already active", "could not bind", "in use")
    )


def start_with_port_retry(start_once, *, what: str):  # type: ignore[no-untyped-def]
    """Call ``start_once()`` until it succeeds; retry only on a lost port race."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return start_once()
        except PortRace as race:
            if attempt == _START_ATTEMPTS:
                raise PeerStartError(
                    f"{what}: port/display still taken after {attempt} attempts\n{race}"
                ) from None
    raise AssertionError("unreachable")


class PortRace(Exception):
    """Internal: the chosen port or display was taken by someone else; try another."""


def await_rfb_listener(proc: Supervised, port: int, timeout: float) -> None:
    """Wait for the banner on *port* and make sure *proc* itself is the listener."""
    try:
        wait_for_rfb_banner(HOST, port, timeout, process=proc)
    except PeerStartError:
        failed_on_port = proc.exited() and port_in_use_failure(proc)
        detail = proc.log_tail()
        proc.stop()
        if failed_on_port:
            raise PortRace(detail) from None
        raise
    if not pid_listens_on(proc.pid, port):
        # Someone else answered on our port (we lost the race): this peer is not usable.
        detail = proc.log_tail()
        proc.stop()
        raise PortRace(f"port {port} answered but not by {proc.name} pid {proc.pid}\n{detail}")
