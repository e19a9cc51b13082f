"""Processes the test peers run as: started under ``timeout`` in their own process group,
stopped by that group only, never outliving the test run; and ``Peer``, what a started
peer offers (``.host``, ``.port``, ``.pid``, ``.stop()``, its work directory and log).

Every process runs under ``timeout`` (a hard lifetime, :data:`PEER_LIFETIME_SECONDS`), gets
SIGTERM if the test process dies (``PR_SET_PDEATHSIG``) and is stopped at interpreter exit
if a test forgot to. Only the processes started here are ever signalled.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

HOST = "127.0.0.1"
PEER_LIFETIME_SECONDS = 1800
INSTALL_HINT = "run scripts/install-deps (as root) to install the test peers"
REPO_ROOT = Path(__file__).resolve().parents[2]

_STOP_GRACE_SECONDS = 5.0


class PeerUnavailable(RuntimeError):
    """A peer's binary or package is not installed; the message says how to install it."""


class PeerStartError(RuntimeError):
    """A peer process started but did not become ready (the message carries its log tail)."""


def deadline(timeout: float) -> float:
    """The ``time.monotonic()`` at which a wait of ``timeout`` seconds ends."""
    return time.monotonic() + timeout


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


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1
_live: set["Supervised"] = set()
_live_lock = threading.Lock()


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        leftovers = list(_live)
    for proc in leftovers:
        proc.stop()


class Supervised:
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
        end = deadline(5.0)
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
        raise PeerStartError(
            f"{self.name}: could not find the process under timeout\n{self.log_tail()}"
        )

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

    ``.workdir`` holds its log (``.log_path``) and private files; it is removed on stop
    (unless adopted with ``owns_workdir=False``).
    """

    host: str = HOST
    port: int
    workdir: Path
    _process: Supervised

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

    def adopt(self, process: Supervised, workdir: Path, *, owns_workdir: bool = True) -> None:
        """Make this peer the face of ``process``, whose files are in ``workdir``.

        ``owns_workdir``: the directory goes with the process (also when the atexit
        safety net stops it); False keeps it, e.g. for a log read after the stop.
        """
        self._process = process
        self.workdir = workdir
        if owns_workdir:
            process.owned_dir = workdir

    def stop(self) -> None:
        """Stop the peer (idempotent) and remove its work directory."""
        self._process.stop()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} pid={self._process.pid}>"


def make_workdir(prefix: str) -> Path:
    """A fresh private temporary directory named after ``prefix``."""
    return Path(tempfile.mkdtemp(prefix=f"cpvm-{prefix}-"))


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` readable by its owner only (0600); returns ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path
