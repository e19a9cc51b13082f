"""Real test peers for cpvm's integration tests: QEMU, TigerVNC's Xvnc, PostgreSQL, Chromium.

Each ``start_*`` helper starts one real server on 127.0.0.1, waits for it with a bounded poll
(the 12-byte RFB banner, or ``pg_isready``), checks that the listening socket really belongs
to the process it started, and returns a :class:`Peer` with ``.host``, ``.port``, ``.pid`` and
``.stop()``; peers are context managers too. Every process runs under ``timeout`` (a hard
lifetime, :data:`PEER_LIFETIME_SECONDS`), gets SIGTERM if the test process dies
(``PR_SET_PDEATHSIG``) and is stopped at interpreter exit if a test forgot to: nothing outlives
the test run. Only the processes started here are ever signalled, by their own process group.

This module is plain Python (no pytest) so benchmarks and scripts can use it as well. A missing
binary raises :class:`PeerUnavailable`, whose message says to run ``scripts/install-deps``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import datetime
import ipaddress
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "PEER_LIFETIME_SECONDS",
    "QEMU_TEST_PASSWORD",
    "XVNC_TEST_PASSWORD",
    "GUEST_READY_MARKER",
    "PeerUnavailable",
    "PeerStartError",
    "Peer",
    "QemuVnc",
    "Xvnc",
    "Postgres",
    "TestPki",
    "free_port",
    "wait_for_rfb_banner",
    "wait_for_file_text",
    "require_binary",
    "start_qemu",
    "start_xvnc",
    "start_postgres",
    "make_test_ca",
    "demo_guest_paths",
    "build_demo_guest",
    "launch_chromium",
    "CHROMIUM_PATH",
    "CHROMIUM_ARGS",
]

HOST = "127.0.0.1"
PEER_LIFETIME_SECONDS = 1800
INSTALL_HINT = "run scripts/install-deps (as root) to install the test peers"
QEMU_TEST_PASSWORD = "qemupw1"
XVNC_TEST_PASSWORD = "secret"
# Written to ttyS0 by the demo guest's /init once its shell runs on the VGA console.
GUEST_READY_MARKER = "cpvm-guest: shell ready"

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)

_START_ATTEMPTS = 5  # a free port can be taken between choosing it and the peer binding it
_STOP_GRACE_SECONDS = 5.0


class PeerUnavailable(RuntimeError):
    """A peer's binary or package is not installed; the message says how to install it."""


class PeerStartError(RuntimeError):
    """A peer process started but did not become ready (the message carries its log tail)."""


# --- small utilities ----------------------------------------------------------------------


def require_binary(name: str, *candidates: str) -> str:
    """Return the path of executable *name* (or the first existing *candidates* path).

    Raises :class:`PeerUnavailable` naming ``scripts/install-deps`` when it is missing.
    """
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise PeerUnavailable(f"{name} not found: {INSTALL_HINT}")
    return found


def free_port(host: str = HOST) -> int:
    """Return a TCP port on *host* that was free a moment ago (bind to port 0, read, close).

    Racy by nature: the start helpers retry with another port when the peer cannot bind.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _deadline(timeout: float) -> float:
    return time.monotonic() + timeout


def wait_for_rfb_banner(
    host: str, port: int, timeout: float = 10.0, *, process: "_Supervised | None" = None
) -> bytes:
    """Poll (bounded by *timeout* seconds) until ``host:port`` answers with an RFB banner.

    Connects, reads the 12-byte ``RFB 00x.00y\\n`` and closes; returns the banner. If
    *process* is given and exits first, raises :class:`PeerStartError` at once.
    """
    end = _deadline(timeout)
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
    end = _deadline(timeout)
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


def _pid_listens_on(pid: int, port: int) -> bool:
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


# --- process supervision --------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_live: set["_Supervised"] = set()
_live_lock = threading.Lock()


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        proc.stop()


class _Supervised:
    """One child started as ``timeout -k 5 LIFETIME argv...`` in its own process group.

    ``wrapper`` is the ``timeout`` Popen; ``pid`` the real program (timeout's only child).
    Stopping signals that process group only: exactly what this object started.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.owned_dir: Path | None = None  # removed by stop(): the peer's work directory
        self.stop_signal = stop_signal
        timeout_bin = require_binary("timeout")
        self._log: IO[bytes] = open(log_path, "ab")
        # PDEATHSIG fires when the forking *thread* exits, so only use it from the main thread.
        in_main_thread = threading.current_thread() is threading.main_thread()
        extra: dict[str, Any] = {}
        if user is not None:
            entry = pwd.getpwnam(user)
            extra.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        self.wrapper = subprocess.Popen(
            [timeout_bin, "-k", "5", str(PEER_LIFETIME_SECONDS), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            process_group=0,
            preexec_fn=_set_parent_death_signal if in_main_thread else None,
            **extra,
        )
        with _live_lock:
            _live.add(self)
        self.pid = self._find_child_pid()

    def _find_child_pid(self) -> int:
        wrapper_pid = self.wrapper.pid
        end = _deadline(5.0)
        while time.monotonic() < end:
            try:
                children = Path(f"/proc/{wrapper_pid}/task/{wrapper_pid}/children").read_text()
            except OSError:
                children = ""
            if children.split():
                return int(children.split()[0])
            if self.wrapper.poll() is not None:
                break
            time.sleep(0.005)
        self.stop()
        raise PeerStartError(f"{self.name}: could not find the process under timeout\n"
                             f"{self.log_tail()}")

    def exited(self) -> bool:
        return self.wrapper.poll() is not None

    def returncode(self) -> int | None:
        return self.wrapper.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"({self.name}: no log)"
        return f"--- {self.name} log ({self.log_path}) ---\n{text[-chars:]}"

    def stop(self, grace: float = _STOP_GRACE_SECONDS) -> int | None:
        """Signal the program, wait up to *grace* seconds, then SIGKILL its process group."""
        if self.wrapper.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.wrapper.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # The group is timeout's (process_group=0): our child and anything it spawned.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.wrapper.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wrapper.wait(grace)
        with _live_lock:
            _live.discard(self)
        if not self._log.closed:
            self._log.close()
        if self.owned_dir is not None:
            shutil.rmtree(self.owned_dir, ignore_errors=True)
        return self.wrapper.returncode


class Peer:
    """A running test peer on 127.0.0.1: ``.host``, ``.port``, ``.pid``, ``.stop()``.

    ``.workdir`` holds its log (``.log_path``) and private files; it is removed on stop.
    """

    host: str = HOST
    port: int
    workdir: Path
    _process: _Supervised

    @property
    def pid(self) -> int:
        """PID of the server program itself (not of its ``timeout`` wrapper)."""
        return self._process.pid

    @property
    def log_path(self) -> Path:
        return self._process.log_path

    def log_text(self) -> str:
        """Everything the peer printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return not self._process.exited()

    def _adopt(self, process: _Supervised, workdir: Path) -> None:
        self._process = process
        self.workdir = workdir
        process.owned_dir = workdir  # so the atexit safety net cleans it up as well

    def stop(self) -> None:
        """Stop the peer (idempotent) and remove its work directory."""
        self._process.stop()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self._process.pid}>"


def _workdir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"cpvm-{prefix}-"))


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _port_in_use_failure(proc: _Supervised) -> bool:
    """Whether a peer that failed to start did so (probably) because its port was taken."""
    log = proc.log_tail().lower()
    return any(
        hint in log
        for hint in ("address already in use", "already active", "could not bind", "in use")
    )


def _start_with_port_retry(start_once, *, what: str):  # type: ignore[no-untyped-def]
    """Call ``start_once()`` until it succeeds; retry only on a lost port race."""
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            return start_once()
        except _PortRace as race:
            if attempt == _START_ATTEMPTS:
                raise PeerStartError(
                    f"{what}: port/display still taken after {attempt} attempts\n{race}"
                ) from None
    raise AssertionError("unreachable")


class _PortRace(Exception):
    """Internal: the chosen port or display was taken by someone else; try another."""


def _await_rfb_listener(proc: _Supervised, port: int, timeout: float) -> None:
    """Wait for the banner on *port* and make sure *proc* itself is the listener."""
    try:
        wait_for_rfb_banner(HOST, port, timeout, process=proc)
    except PeerStartError:
        failed_on_port = proc.exited() and _port_in_use_failure(proc)
        detail = proc.log_tail()
        proc.stop()
        if failed_on_port:
            raise _PortRace(detail) from None
        raise
    if not _pid_listens_on(proc.pid, port):
        # Someone else answered on our port (we lost the race): this peer is not usable.
        detail = proc.log_tail()
        proc.stop()
        raise _PortRace(f"port {port} answered but not by {proc.name} pid {proc.pid}\n{detail}")


# --- QEMU -----------------------------------------------------------------------------------


class QemuVnc(Peer):
    """A QEMU (TCG, no disk) whose console is a VNC server on ``.port``.

    ``.display`` is the VNC display number (port - 5900), ``.password`` the VNC password or
    None, ``.tls_dir`` the X509 credentials dir or None, ``.serial_log`` the guest's serial
    output file or None. ``.monitor(cmd)`` runs a human-monitor command (e.g. ``"screendump
    /tmp/x.ppm"``, ``"sendkey ret"``, ``"change vnc password x"``) and returns its output.
    """

    def __init__(
        self,
        process: _Supervised,
        port: int,
        workdir: Path,
        password: str | None,
        tls_dir: Path | None,
        serial_log: Path | None,
        monitor_path: Path,
    ) -> None:
        self._adopt(process, workdir)
        self.port = port
        self.display = port - 5900
        self.password = password
        self.tls_dir = tls_dir
        self.serial_log = serial_log
        self.monitor_path = monitor_path

    def monitor(self, command: str, timeout: float = 10.0) -> str:
        """Send one HMP command over the monitor socket; return what QEMU printed for it."""
        prompt = b"(qemu) "
        end = _deadline(timeout)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))

            def read_until_prompt() -> bytes:
                data = b""
                while not data.endswith(prompt):
                    sock.settimeout(max(0.01, end - time.monotonic()))
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data

            read_until_prompt()  # the greeting
            sock.sendall(command.encode() + b"\n")
            out = read_until_prompt()
        # HMP echoes the command line with terminal escapes; keep only the lines after it.
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
        lines = text.replace("\r", "").split("\n")
        return "\n".join(lines[1:-1]).strip()

    def wait_for_serial(self, text: str, timeout: float = 30.0) -> str:
        """Poll (bounded) the serial log until it contains *text*; return the log."""
        if self.serial_log is None:
            raise ValueError("this QEMU was started without serial_log")
        return wait_for_file_text(self.serial_log, text, timeout)


def start_qemu(
    password: str | None,
    *,
    tls_dir: Path | None = None,
    guest: tuple[Path, Path] | None = None,
    serial_log: Path | None = None,
    append: str = "console=ttyS0 console=tty0 quiet",
    timeout: float = 15.0,
) -> QemuVnc:
    """Start ``qemu-system-x86_64`` with a VNC server on a free 127.0.0.1 port.

    *password*: VNC Authentication (QEMU then offers security type 2 only), passed through a
    0600 secret file, never argv. *tls_dir*: a dir with ca-cert.pem / server-cert.pem /
    server-key.pem (see :func:`make_test_ca`) -> VeNCrypt X509 (type 19; subtype 261 with a
    password, 260 without). *guest*: ``(vmlinuz, initrd)`` to boot (e.g. the demo guest,
    :func:`demo_guest_paths`) with kernel command line *append*; without it SeaBIOS shows
    "No bootable device". *serial_log*: file receiving the guest's ttyS0.
    """
    qemu = require_binary("qemu-system-x86_64")
    if tls_dir is not None:
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            if not (Path(tls_dir) / name).is_file():
                raise ValueError(f"tls_dir {tls_dir} has no {name}")
    if guest is not None:
        for path in guest:
            if not Path(path).is_file():
                raise PeerUnavailable(f"demo guest file {path} missing: {INSTALL_HINT}")

    def start_once() -> QemuVnc:
        workdir = _workdir("qemu")
        port = free_port()
        while port < 5900:  # VNC display numbers start at 5900; ephemeral ports are higher
            port = free_port()
        monitor_path = workdir / "monitor.sock"
        argv = [
            qemu,
            "-machine", "pc,accel=tcg",
            "-m", "128" if guest else "64",
            "-display", "none",
            "-nodefaults",
            "-vga", "std",
            "-monitor", f"unix:{monitor_path},server=on,wait=off",
        ]  # fmt: skip
        vnc = f"{HOST}:{port - 5900}"
        if password is not None:
            secret = _write_private(workdir / "vnc-password", password.encode())
            argv += ["-object", f"secret,id=vncpw,file={secret}"]
            vnc += ",password-secret=vncpw"
        if tls_dir is not None:
            argv += [
                "-object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=off",
            ]
            vnc += ",tls-creds=tls0"
        argv += ["-vnc", vnc]
        if guest is not None:
            kernel, initrd = guest
            argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
        if serial_log is not None:
            argv += ["-serial", f"file:{serial_log}"]
        proc = _Supervised("qemu", argv, workdir / "qemu.log")
        try:
            _await_rfb_listener(proc, port, timeout)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return QemuVnc(proc, port, workdir, password, tls_dir, serial_log, monitor_path)

    return _start_with_port_retry(start_once, what="qemu")


def demo_guest_paths(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """``(vmlinuz, initrd.gz)`` of the demo guest built by ``scripts/build-demo-guest``."""
    if cache_dir is None:
        if os.environ.get("CPVM_GUEST_DIR"):
            cache_dir = Path(os.environ["CPVM_GUEST_DIR"])
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache_dir = Path(cache) / "cpvm" / "guest"
    return cache_dir / "vmlinuz", cache_dir / "initrd.gz"


def build_demo_guest(cache_dir: Path | None = None, timeout: float = 300.0) -> tuple[Path, Path]:
    """Run ``scripts/build-demo-guest`` (a no-op when built) and return the guest's paths."""
    kernel, initrd = demo_guest_paths(cache_dir)
    script = REPO_ROOT / "scripts" / "build-demo-guest"
    result = subprocess.run(
        ["bash", str(script), str(kernel.parent)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0 or not (kernel.is_file() and initrd.is_file()):
        raise PeerUnavailable(
            f"building the demo guest failed ({INSTALL_HINT}):\n{result.stdout}{result.stderr}"
        )
    return kernel, initrd


# --- TigerVNC -------------------------------------------------------------------------------


class Xvnc(Peer):
    """TigerVNC's ``Xvnc`` X server + VNC server: ``.display`` (X display number), ``.port``.

    ``.run_client(argv)`` starts an X client (e.g. xterm) on this display; it is stopped with
    the server. ``.password`` and ``.security_types`` are what it was started with.
    """

    def __init__(
        self,
        process: _Supervised,
        port: int,
        display: int,
        workdir: Path,
        security_types: str,
        password: str | None,
    ) -> None:
        self._adopt(process, workdir)
        self.port = port
        self.display = display
        self.security_types = security_types
        self.password = password
        self._clients: list[_Supervised] = []

    @property
    def display_name(self) -> str:
        """The ``DISPLAY`` value for clients, e.g. ``":123"``."""
        return f":{self.display}"

    def run_client(
        self, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start X client *argv* with ``DISPLAY`` set to this server; returns its Popen.

        The Popen is its ``timeout`` wrapper (terminate/kill/wait reach the client). Clients
        are stopped before the server.
        """
        client_env = dict(os.environ if env is None else env)
        client_env["DISPLAY"] = self.display_name
        client_env.pop("XAUTHORITY", None)
        name = Path(argv[0]).name
        proc = _Supervised(
            f"xvnc-client-{name}",
            [require_binary(argv[0]), *argv[1:]],
            self.workdir / f"client-{len(self._clients)}-{name}.log",
            env=client_env,
        )
        self._clients.append(proc)
        return proc.wrapper

    def run_xterm(self, *extra: str, command: Sequence[str] = ("cat",)) -> subprocess.Popen:
        """Start an xterm at the top-left (100x30, DejaVu Sans Mono 14) running *command*.

        There is no window manager: focus follows the pointer, so move the pointer over the
        window before typing into it.
        """
        return self.run_client(
            ["xterm", "-geometry", "100x30+0+0", "-fa", "DejaVu Sans Mono", "-fs", "14",
             *extra, "-e", *command]
        )  # fmt: skip

    def stop(self) -> None:
        for client in reversed(self._clients):
            client.stop(grace=2.0)
        super().stop()


_XVNC_PASSWORD_TYPES = {"vncauth", "tlsvnc", "x509vnc"}
_XVNC_X509_TYPES = {"x509none", "x509vnc", "x509plain"}


def _pick_x_display() -> int:
    """A display number with no X socket or lock file (Xvnc refuses taken ones; we retry)."""
    for _ in range(200):
        display = random.randint(100, 4000)
        if not (
            Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists()
        ):
            return display
    raise PeerStartError("no free X display number found between 100 and 4000")


def start_xvnc(
    security_types: str = "VncAuth",
    password: str | None = XVNC_TEST_PASSWORD,
    *,
    x509: tuple[Path, Path] | None = None,
    geometry: str = "1024x768",
    timeout: float = 15.0,
) -> Xvnc:
    """Start TigerVNC ``Xvnc`` on a free display and a free 127.0.0.1 port.

    *security_types* is Xvnc's ``-SecurityTypes`` list, e.g. ``"VncAuth"`` -> [2], ``"None"``
    -> [1], ``"X509Vnc"`` -> [19] with VeNCrypt subtypes [261], ``"X509Vnc,VncAuth"`` -> [19, 2]
    / [261, 2]. Note ``"VeNCrypt"`` is itself type 19: ``"VeNCrypt,X509Vnc"`` offers [19, 19].
    *password* feeds
    ``-rfbauth`` (through ``vncpasswd -f`` on stdin; at most 8 characters count). *x509* is
    ``(cert.pem, key.pem)`` for the X509* types, e.g. ``(pki.server_cert, pki.server_key)``.
    """
    xvnc_bin = require_binary("Xvnc")
    types = {t.strip().lower() for t in security_types.split(",")}
    if types & _XVNC_PASSWORD_TYPES and password is None:
        raise ValueError(f"SecurityTypes {security_types} need a password")
    if types & _XVNC_X509_TYPES and x509 is None:
        raise ValueError(f"SecurityTypes {security_types} need x509=(cert, key)")

    def start_once() -> Xvnc:
        workdir = _workdir("xvnc")
        port = free_port()
        display = _pick_x_display()
        argv = [
            xvnc_bin, f":{display}",
            "-rfbport", str(port),
            "-localhost",
            "-interface", HOST,
            "-nolisten", "tcp",
            "-SecurityTypes", security_types,
            "-geometry", geometry,
            "-depth", "24",
            "-desktop", "cpvm-test",
        ]  # fmt: skip
        if password is not None:
            vncpasswd = require_binary("vncpasswd")
            obfuscated = subprocess.run(
                [vncpasswd, "-f"], input=password.encode() + b"\n", capture_output=True,
                check=True, timeout=10,
            ).stdout  # fmt: skip
            argv += ["-rfbauth", str(_write_private(workdir / "passwd", obfuscated))]
        if x509 is not None:
            argv += ["-X509Cert", str(x509[0]), "-X509Key", str(x509[1])]
        proc = _Supervised("Xvnc", argv, workdir / "xvnc.log", cwd=workdir)
        try:
            _await_rfb_listener(proc, port, timeout)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return Xvnc(proc, port, display, workdir, security_types, password)

    return _start_with_port_retry(start_once, what="Xvnc")


# --- PostgreSQL -----------------------------------------------------------------------------


def _postgres_bindir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise PeerUnavailable(f"PostgreSQL server (postgres, initdb) not found: {INSTALL_HINT}")


class Postgres(Peer):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust auth and database ``cpvm_test``.

    ``.dsn`` is a libpq key/value string for ``cpvm_test`` (``.url`` the same as a URL),
    ``.user`` the superuser (``postgres``), ``.socket_dir`` the unix socket directory.
    ``.create_database(name)`` makes another empty database and returns its DSN.
    """

    database = "cpvm_test"
    user = "postgres"

    def __init__(
        self, process: _Supervised, port: int, workdir: Path, bindir: Path, socket_dir: Path
    ) -> None:
        self._adopt(process, workdir)
        self.port = port
        self.bindir = bindir
        self.socket_dir = socket_dir

    def dsn_for(self, database: str) -> str:
        return f"host={self.host} port={self.port} dbname={database} user={self.user}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def create_database(self, name: str) -> str:
        """Create empty database *name* (a plain identifier) and return its DSN."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain identifier: {name!r}")
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port),
             "-U", self.user, name],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return self.dsn_for(name)


def start_postgres(tmpdir: Path | None = None, *, timeout: float = 30.0) -> Postgres:
    """initdb + start a PostgreSQL server listening on 127.0.0.1:<free port>.

    The cluster lives under *tmpdir* when the server user can use it; as root the server
    runs as the ``postgres`` system user in a private directory it owns (pytest's tmp dirs
    are root-only), removed on stop. Durability is off (fsync etc.): it is a test database.
    """
    bindir = _postgres_bindir()
    for tool in ("initdb", "pg_isready", "createdb"):
        if not (bindir / tool).exists():
            raise PeerUnavailable(f"{bindir / tool} not found: {INSTALL_HINT}")
    as_root = os.geteuid() == 0
    run_as: str | None = None
    if as_root:
        try:
            pwent = pwd.getpwnam("postgres")
        except KeyError:
            raise PeerUnavailable(f"no 'postgres' system user: {INSTALL_HINT}") from None
        run_as = "postgres"
        workdir = _workdir("postgres")
        os.chown(workdir, pwent.pw_uid, pwent.pw_gid)
    else:
        base = Path(tmpdir) if tmpdir is not None else Path(tempfile.gettempdir())
        workdir = Path(tempfile.mkdtemp(prefix="cpvm-postgres-", dir=base))
    datadir = workdir / "data"
    socket_dir = workdir / "sock"
    user_kw: dict[str, Any] = {}
    if run_as is not None:
        user_kw = dict(user=pwent.pw_uid, group=pwent.pw_gid, extra_groups=[])
    try:
        os.mkdir(socket_dir, 0o700)
        if run_as is not None:
            os.chown(socket_dir, pwent.pw_uid, pwent.pw_gid)
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(datadir), "-U", Postgres.user, "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, timeout=120, cwd=workdir, **user_kw,
        )  # fmt: skip
        if init.returncode != 0:
            raise PeerStartError(f"initdb failed:\n{init.stdout}{init.stderr}")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def start_once() -> Postgres:
        port = free_port()
        argv = [
            str(bindir / "postgres"), "-D", str(datadir),
            "-c", f"listen_addresses={HOST}",
            "-c", f"port={port}",
            "-c", f"unix_socket_directories={socket_dir}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log_path = workdir / f"postgres-{port}.log"
        # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, stop now.
        proc = _Supervised(
            "postgres", argv, log_path, user=run_as, cwd=workdir, stop_signal=signal.SIGINT
        )
        end = _deadline(timeout)
        ready = False
        while time.monotonic() < end and not proc.exited():
            check = subprocess.run(
                [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1"],
                capture_output=True, timeout=10,
            )  # fmt: skip
            if check.returncode == 0:
                ready = True
                break
            time.sleep(0.05)
        if not ready or not _pid_listens_on(proc.pid, port):
            detail = proc.log_tail()
            # Ready but not ours: someone else answers on the port. Or it could not bind.
            port_race = ready or _port_in_use_failure(proc)
            proc.stop()
            if port_race:
                raise _PortRace(detail)
            raise PeerStartError(f"postgres not ready on {HOST}:{port} in {timeout:g}s\n{detail}")
        peer = Postgres(proc, port, workdir, bindir, socket_dir)
        try:
            peer.create_database(Postgres.database)
        except subprocess.CalledProcessError as exc:
            peer._process.stop()
            raise PeerStartError(f"createdb {Postgres.database} failed: {exc.stderr!r}") from exc
        return peer

    try:
        return _start_with_port_retry(start_once, what="postgres")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


# --- X509 test PKI --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestPki:
    """A CA and a server certificate, as PEM files in one directory.

    The layout is QEMU's ``tls-creds-x509`` dir: ``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem`` (plus ``ca-key.pem``). ``issue_server_cert`` signs another leaf with
    the same CA (certificate rotation, expired or wrong-name certificates); ``other_ca`` makes
    an unrelated CA with its own leaf ("wrong CA" tests).
    """

    __test__ = False  # not a pytest test class despite the name

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hostnames: tuple[str, ...]

    @property
    def ca_cert_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def issue_server_cert(
        self,
        dir: Path,
        hostnames: Iterable[str] | None = None,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> "TestPki":
        """Sign a new server leaf with this CA into *dir* (same layout, CA files copied)."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        names = tuple(hostnames) if hostnames is not None else self.hostnames
        ca_key = _load_key(self.ca_key)
        ca_cert = _load_cert(self.ca_cert)
        shutil.copyfile(self.ca_cert, dir / "ca-cert.pem")
        shutil.copyfile(self.ca_key, dir / "ca-key.pem")
        os.chmod(dir / "ca-key.pem", 0o600)
        _write_leaf(dir, ca_cert, ca_key, names, not_before, not_after)
        return _pki_in(dir, names)

    def other_ca(self, dir: Path, hostnames: Iterable[str] | None = None) -> "TestPki":
        """A brand-new, unrelated CA (and leaf for the same names) in *dir*."""
        return make_test_ca(dir, tuple(hostnames) if hostnames is not None else self.hostnames)


def _load_key(path: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _load_cert(path: Path):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import rsa

    # RSA: what every VeNCrypt peer (GnuTLS in QEMU and TigerVNC, OpenSSL) handles.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


def _san(hostnames: Sequence[str]):  # type: ignore[no-untyped-def]
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(names)


def _write_leaf(  # type: ignore[no-untyped-def]
    dir, ca_cert, ca_key, hostnames, not_before, not_after
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (dir / "server-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(dir / "server-key.pem", key)


def _pki_in(dir: Path, hostnames: tuple[str, ...]) -> TestPki:
    return TestPki(
        dir=dir,
        ca_cert=dir / "ca-cert.pem",
        ca_key=dir / "ca-key.pem",
        server_cert=dir / "server-cert.pem",
        server_key=dir / "server-key.pem",
        hostnames=hostnames,
    )


def make_test_ca(dir: Path, hostnames: Sequence[str] = ("127.0.0.1", "localhost")) -> TestPki:
    """Create a CA and a server leaf for *hostnames* in *dir* with ``cryptography``.

    The leaf has CA:FALSE, serverAuth and a SAN with each hostname (IPs as IP entries);
    QEMU refuses a self-signed CA:TRUE server certificate, hence the two-level chain.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise PeerUnavailable(f"python 'cryptography' missing: {INSTALL_HINT}") from None
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    hostnames = tuple(hostnames)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = _new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cpvm tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cpvm test CA {os.urandom(4).hex()}"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, key_encipherment=False, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (dir / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(dir / "ca-key.pem", ca_key)
    _write_leaf(dir, ca_cert, ca_key, hostnames, None, None)
    return _pki_in(dir, hostnames)


# --- Chromium -------------------------------------------------------------------------------


def launch_chromium(playwright: Any, *, headless: bool = True, args: Sequence[str] = ()) -> Any:
    """Launch Debian's ``/usr/bin/chromium`` through Playwright (never ``playwright install``).

    *playwright* is the object from ``sync_playwright().start()`` (returns a ``Browser``) or
    ``async_playwright()`` (returns an awaitable of one). Playwright gives each launch a
    fresh temporary profile (user data dir) and deletes it on ``browser.close()``; it refuses
    a ``--user-data-dir`` argument on ``launch``.
    """
    if not os.access(CHROMIUM_PATH, os.X_OK):
        raise PeerUnavailable(f"{CHROMIUM_PATH} not found: {INSTALL_HINT}")
    flags = [flag for flag in CHROMIUM_ARGS if headless or flag != "--headless"]
    return playwright.chromium.launch(
        executable_path=CHROMIUM_PATH,
        headless=headless,
        args=[*flags, *args],
        chromium_sandbox=False,
        timeout=60_000,
    )

