"""Start cpvm (and its manager) as real ``twistd`` processes for integration tests.

Each daemon listens on port 0 on 127.0.0.1 and the port is read from its own log line
("... starting on N"), so there is no race for a free port.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.peers import HOST, REPO_ROOT, Peer, PeerStartError, Supervised, make_workdir

_STARTING = re.compile(r"starting on (\d+)")


def _wait_for_port(proc: Supervised, timeout: float, what: str, skip: int = 0) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        ports = _STARTING.findall(text)
        if len(ports) > skip:
            return int(ports[skip])
        if proc.exited():
            break
        time.sleep(0.05)
    tail = proc.log_tail()
    proc.stop()
    raise PeerStartError(f"{what} did not start listening within {timeout} s\n{tail}")


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """A blocking GET for test set-up only (never inside the reactor)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


class Daemon(Peer):
    """A cpvm or cpvm-manager process started through twistd."""

    def __init__(
        self,
        name: str,
        plugin: str,
        config_text: str,
        *,
        workdir: Path | None = None,
        timeout: float = 20.0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.workdir = workdir or make_workdir(name)
        self.config_path = self.workdir / f"{name}.conf"
        self.config_path.write_text(config_text)
        argv = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "--nodaemon",
            "--pidfile=",
            "--reactor=cpvm",
            *extra_args,
            plugin,
            "--config",
            str(self.config_path),
        ]
        # The plugin module is found through the checkout's twisted/plugins directory.
        # (``env`` adds to or overrides the test's own environment, e.g. TMPDIR.)
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        proc = Supervised(name, argv, self.workdir / f"{name}.log", cwd=self.workdir, env=full_env)
        # The directory stays after the stop: fixtures read the log afterwards.
        self.adopt(proc, self.workdir, owns_workdir=False)
        self.port = _wait_for_port(proc, timeout, name)

    def url(self, path: str = "") -> str:
        return f"http://{HOST}:{self.port}{path}"


def cpvm_config(
    manager_url: str, *, credential_file: Path | None = None, extra: str = "", **sections: dict
) -> str:
    """A cpvm.conf for tests: listens on 127.0.0.1 port 0; ``sections`` add settings."""
    values: dict[str, dict] = {
        # A short grace: at teardown the test reactor is not running to answer the last
        # heartbeat, and each stop would otherwise wait for it.
        # Never the default /var/lib/cpvm: a root-owned one there would break the package's.
        "server": {
            "bind": HOST,
            "port": 0,
            "public_host": HOST,
            "grace_period": 1,
            "state_directory": tempfile.mkdtemp(prefix="cpvm-state-"),
        },
        "manager": {"url": manager_url, "timeout": 3, "heartbeat_interval": 1},
    }
    if credential_file is not None:
        values["manager"]["credential_file"] = str(credential_file)
    for section, settings in sections.items():
        values.setdefault(section, {}).update(settings)
    lines = []
    for section, settings in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n" + extra


def start_cpvm(config_text: str, **kwargs) -> Daemon:
    return Daemon("cpvm", "cpvm", config_text, **kwargs)


def process_rss_kib(pid: int) -> int:
    """Resident memory of one process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


__all__ = ["Daemon", "cpvm_config", "start_cpvm", "http_get", "process_rss_kib", "PeerStartError"]
