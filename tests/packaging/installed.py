"""Run cpvm's daemons from the installed .deb exactly as their systemd units would.

systemd is not PID 1 on the test machines, so ``installed_daemon`` reads the installed unit
file (``/lib/systemd/system/<unit>.service``) and starts its ``ExecStart=`` command line as
the unit's ``User=`` with ``runuser``, with the unit's ``UMask=`` and ``LimitNOFILE=``,
``/`` as working directory and a clean environment. Only the ``--config`` argument is
replaced, by a file holding the given text. The sandbox settings are not reproduced.

    with installed_daemon("cpvm", cpvm_conf_text) as port:
        urlopen(f"http://127.0.0.1:{port}/healthz")

Give the daemon a configuration that listens on 127.0.0.1 port 0: the port is read from
twistd's "... starting on N" log line, so there is no race for a free port.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import resource
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

UNIT_DIR = Path("/lib/systemd/system")
_STARTING = re.compile(r"starting on (\d+)")
# systemd's environment for system services, minus what the units do not use.
_SERVICE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin", "LANG": "C.UTF-8"}


class DaemonStartError(Exception):
    """The installed daemon exited or did not listen in time; carries its output."""


def unit_settings(unit_path: Path) -> dict[str, list[str]]:
    """``[Service]``-and-other settings of a unit file: key -> values in file order."""
    settings: dict[str, list[str]] = {}
    for raw in unit_path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def unit_command(unit: str, config_path: str | Path, unit_dir: Path = UNIT_DIR) -> list[str]:
    """The unit's ``ExecStart=`` argv with the ``--config`` value replaced."""
    (exec_start,) = unit_settings(unit_dir / f"{unit}.service")["ExecStart"]
    argv = shlex.split(exec_start.lstrip("-@:+!"))
    index = argv.index("--config")
    argv[index + 1] = str(config_path)
    return argv


def http_status(url: str, timeout: float = 5.0) -> int:
    """The status code of a GET (test set-up only; blocking)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@contextlib.contextmanager
def installed_daemon(unit: str, config_text: str, *, timeout: float = 30.0,
                     sandbox: bool = True, unit_dir: Path = UNIT_DIR) -> Iterator[int]:
    """Start ``unit``'s ExecStart as its user with ``config_text``; yield its port.

    On leaving, the daemon gets SIGTERM (the unit's KillSignal) and must exit within the
    unit's TimeoutStopSec; a start failure raises DaemonStartError with the output.
    """
    settings = unit_settings(unit_dir / f"{unit}.service")
    user = pwd.getpwnam(settings["User"][0])
    umask = int(settings.get("UMask", ["0022"])[0], 8)
    nofile = int(settings.get("LimitNOFILE", ["1024"])[0])
    stop_timeout = float(settings.get("TimeoutStopSec", ["90"])[0])

    workdir = Path(tempfile.mkdtemp(prefix=f"{unit}-installed-"))
    config_path = workdir / f"{unit}.conf"
    config_path.write_text(config_text)
    os.chown(workdir, 0, user.pw_gid)
    os.chmod(workdir, 0o750)
    os.chown(config_path, 0, user.pw_gid)
    os.chmod(config_path, 0o640)
    argv = ["runuser", "-u", user.pw_name, "--", *unit_command(unit, config_path, unit_dir)]
    if sandbox:
        argv = sandboxed_command(argv, settings)

    # The unit's LimitNOFILE=, or as near as this (possibly unprivileged) process may go.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)
    argv = ["prlimit", f"--nofile={nofile}", "--", *argv]

    proc = subprocess.Popen(argv, cwd="/", env=dict(_SERVICE_ENV), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, umask=umask,
                            start_new_session=True)
    lines: list[str] = []

    def collect() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode("utf-8", "replace"))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        port = _wait_for_port(proc, lines, timeout, " ".join(argv))
        yield port
    finally:
        _stop(proc, stop_timeout)
        reader.join(5)
        shutil.rmtree(workdir, ignore_errors=True)


# Runs as root in a new mount namespace, then execs the command ("$@" after the "--").
_SANDBOX_SCRIPT = r"""
set -eu
writable=""
while [ "$1" != -- ]; do writable="$writable $1"; shift; done
shift
mount --make-rprivate /
mount -t proc -o subset=pid,hidepid=invisible proc /proc
for dir in $writable; do mkdir -p "$dir"; done
for dir in / /usr /etc /var /boot; do
    if [ -d "$dir" ]; then mount --bind "$dir" "$dir" && mount -o remount,bind,ro "$dir"; fi
done
for dir in $writable; do mount --bind "$dir" "$dir" && mount -o remount,bind,rw "$dir"; done
exec setpriv --no-new-privs "$@"
"""


def sandboxed_command(argv: list[str], settings: dict[str, list[str]]) -> list[str]:
    """``argv`` wrapped to run in the approximation of a unit's sandbox (module docstring)."""
    writable = [f"/var/lib/{d}" for v in settings.get("StateDirectory", []) for d in v.split()]
    writable += [f"/var/log/{d}" for v in settings.get("LogsDirectory", []) for d in v.split()]
    writable += [p.lstrip("-") for v in settings.get("ReadWritePaths", []) for p in v.split()]
    return ["unshare", "--mount", "sh", "-c", _SANDBOX_SCRIPT, "sandbox", *writable, "--",
            *argv]


def _wait_for_port(proc: subprocess.Popen, lines: list[str], timeout: float,
                   what: str) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            match = _STARTING.search(line)
            if match:
                return int(match.group(1))
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader drain the last lines
            raise DaemonStartError(f"{what} exited with {proc.returncode}:\n{''.join(lines)}")
        time.sleep(0.05)
    raise DaemonStartError(f"{what} did not listen within {timeout} s:\n{''.join(lines)}")


def _stop(proc: subprocess.Popen, stop_timeout: float) -> None:
    if proc.poll() is not None:
        return
    # SIGTERM to the daemon itself, as systemd's KillSignal would deliver it. Not to
    # runuser: it would forward it but SIGKILL the daemon 2 s later, mid-drain.
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = children.read_text().split() if children.exists() else []
    if pids:
        os.kill(int(pids[0]), signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(stop_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"daemon ignored SIGTERM for {stop_timeout} s (TimeoutStopSec)")


__all__ = ["DaemonStartError", "http_status", "installed_daemon", "sandboxed_command",
           "unit_command", "unit_settings"]
