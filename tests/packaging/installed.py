"""Run cpvm's daemons from the installed .deb exactly as their systemd units would.

systemd is not PID 1 on the test machines, so ``installed_daemon`` reads the installed unit
file (``/lib/systemd/system/<unit>.service``) and starts its ``ExecStart=`` command line as
the unit's ``User=`` (``setpriv``, which like systemd's ``User=`` goes through no PAM
session), with the unit's ``UMask=`` and ``LimitNOFILE=``, ``/`` as working directory and
systemd's environment for a service user. Only the ``--config`` argument is replaced, by a
file holding the given text. Part of the sandbox is reproduced (``sandboxed_command``: the
read-only OS, the unit's writable directories, ``InaccessiblePaths=``, ``ProcSubset=pid``,
``ProtectProc=invisible``, ``NoNewPrivileges=``).

Not ``runuser``: its PAM session (``pam_limits``) lowers the soft open-files limit back to
1024, so the daemon would not run with the unit's ``LimitNOFILE=``.

    with installed_daemon("cpvm", cpvm_conf_text) as port:
        urlopen(f"http://127.0.0.1:{port}/healthz")

Give the daemon a configuration that listens on 127.0.0.1 port 0: the port is read from
twistd's "... starting on N" log line, so there is no race for a free port. Pass a list as
``output`` to get the daemon's log lines (stdout and stderr, its workers' too); it is
complete once the ``with`` block has been left.
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
def config_file(unit: str, config_text: str, unit_dir: Path = UNIT_DIR) -> Iterator[Path]:
    """A configuration file holding ``config_text``, readable by ``unit``'s user only
    (root:group 0640 in a root:group 0750 directory, like the packaged conffiles)."""
    user = pwd.getpwnam(unit_settings(unit_dir / f"{unit}.service")["User"][0])
    workdir = Path(tempfile.mkdtemp(prefix=f"{unit}-installed-"))
    config_path = workdir / f"{unit}.conf"
    config_path.write_text(config_text)
    os.chown(workdir, 0, user.pw_gid)
    os.chmod(workdir, 0o750)
    os.chown(config_path, 0, user.pw_gid)
    os.chmod(config_path, 0o640)
    try:
        yield config_path
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def installed_daemon(
    unit: str,
    config_text: str,
    *,
    timeout: float = 30.0,
    sandbox: bool = True,
    unit_dir: Path = UNIT_DIR,
    output: list[str] | None = None,
) -> Iterator[int]:
    """Start ``unit``'s ExecStart as its user with ``config_text``; yield its port.

    On leaving, the daemon gets SIGTERM (the unit's KillSignal) and must exit within the
    unit's TimeoutStopSec; a start failure raises DaemonStartError with the output.
    ``output``, if given, receives the daemon's log lines.
    """
    with config_file(unit, config_text, unit_dir) as config_path:
        yield from _run_daemon(
            unit, config_path, timeout=timeout, sandbox=sandbox, unit_dir=unit_dir, output=output
        )


def _run_daemon(
    unit: str,
    config_path: Path,
    *,
    timeout: float,
    sandbox: bool,
    unit_dir: Path,
    output: list[str] | None,
) -> Iterator[int]:
    settings = unit_settings(unit_dir / f"{unit}.service")
    user = pwd.getpwnam(settings["User"][0])
    umask = int(settings.get("UMask", ["0022"])[0], 8)
    nofile = int(settings.get("LimitNOFILE", ["1024"])[0])
    stop_timeout = float(settings.get("TimeoutStopSec", ["90"])[0])
    argv = [*as_user(user), *unit_command(unit, config_path, unit_dir)]
    if sandbox:
        argv = sandboxed_command(argv, settings)

    # The unit's LimitNOFILE=, or as near as this (possibly unprivileged) process may go.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY:
        nofile = min(nofile, hard)
    argv = ["prlimit", f"--nofile={nofile}", "--", *argv]

    # What systemd sets for a service with User=.
    env = {
        **_SERVICE_ENV,
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": user.pw_shell,
    }
    # RuntimeDirectory=: created for the user before start, removed after stop.
    runtime = [f"/run/{d}" for v in settings.get("RuntimeDirectory", []) for d in v.split()]
    for directory in runtime:
        os.makedirs(directory, exist_ok=True)
        os.chown(directory, user.pw_uid, user.pw_gid)
        os.chmod(directory, int(settings.get("RuntimeDirectoryMode", ["0755"])[0], 8))
    if runtime:
        env["RUNTIME_DIRECTORY"] = ":".join(runtime)
    # Every wrapper execs the next, so proc.pid is the daemon's own pid ($MAINPID).
    proc = subprocess.Popen(
        argv,
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        umask=umask,
        start_new_session=True,
    )
    lines: list[str] = output if output is not None else []

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
        for directory in runtime:
            shutil.rmtree(directory, ignore_errors=True)


def as_user(user: pwd.struct_passwd) -> list[str]:
    """The command prefix that runs a command as ``user`` the way systemd's ``User=`` does:
    its uid, gid and supplementary groups, no PAM session, then exec."""
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "--"]


# Runs as root in a new mount namespace, then execs the command ("$@" after the "--").
# Arguments before it: "rw:PATH" (StateDirectory= and the like: writable), "hide:PATH"
# (InaccessiblePaths=: a mode 0000 empty directory or file mounted over it, as systemd does;
# a missing path is skipped, as with systemd's "-" prefix).
_SANDBOX_SCRIPT = r"""
set -eu
writable="" hidden=""
while [ "$1" != -- ]; do
    case "$1" in rw:*) writable="$writable ${1#rw:}" ;; hide:*) hidden="$hidden ${1#hide:}" ;; esac
    shift
done
shift
mount --make-rprivate /
mount -t proc -o subset=pid,hidepid=invisible proc /proc
for dir in $writable; do mkdir -p "$dir"; done
# The 0000 nodes, on a tmpfs only this namespace sees (/dev/shm stays writable, for rmdir).
nodes=$(mktemp -d /dev/shm/cpvm-sandbox.XXXXXX)
mount -t tmpfs -o mode=0755,size=16k tmpfs "$nodes"
mkdir -m 0 "$nodes/dir"; : > "$nodes/file"; chmod 0 "$nodes/file"
for dir in / /usr /etc /var /boot; do
    if [ -d "$dir" ]; then mount --bind "$dir" "$dir" && mount -o remount,bind,ro "$dir"; fi
done
for dir in $writable; do mount --bind "$dir" "$dir" && mount -o remount,bind,rw "$dir"; done
for path in $hidden; do
    if [ -d "$path" ]; then mount --bind "$nodes/dir" "$path"
    elif [ -e "$path" ]; then mount --bind "$nodes/file" "$path"; fi
done
umount -l "$nodes" && rmdir "$nodes"
exec setpriv --no-new-privs "$@"
"""


def sandboxed_command(argv: list[str], settings: dict[str, list[str]]) -> list[str]:
    """``argv`` wrapped to run in the approximation of a unit's sandbox (module docstring)."""
    writable = [f"/var/lib/{d}" for v in settings.get("StateDirectory", []) for d in v.split()]
    writable += [f"/var/log/{d}" for v in settings.get("LogsDirectory", []) for d in v.split()]
    writable += [f"/run/{d}" for v in settings.get("RuntimeDirectory", []) for d in v.split()]
    writable += [p.lstrip("-") for v in settings.get("ReadWritePaths", []) for p in v.split()]
    hidden = [p.lstrip("-") for v in settings.get("InaccessiblePaths", []) for p in v.split()]
    return [
        "unshare",
        "--mount",
        "sh",
        "-c",
        _SANDBOX_SCRIPT,
        "sandbox",
        *(f"rw:{p}" for p in writable),
        *(f"hide:{p}" for p in hidden),
        "--",
        *argv,
    ]


def _wait_for_port(proc: subprocess.Popen, lines: list[str], timeout: float, what: str) -> int:
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
    # SIGTERM to the daemon's main process only, as systemd's KillSignal= with
    # KillMode=mixed: a multi-process daemon stops its own workers.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(stop_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(
            f"daemon ignored SIGTERM for {stop_timeout} s (TimeoutStopSec)"
        ) from None


def pids_listening_on(port: int) -> set[int]:
    """Processes holding a listening TCP socket on ``port`` (from /proc, as root)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                pids.add(int(entry.name))
    return pids


__all__ = [
    "DaemonStartError",
    "as_user",
    "config_file",
    "http_status",
    "installed_daemon",
    "pids_listening_on",
    "sandboxed_command",
    "unit_command",
    "unit_settings",
]
