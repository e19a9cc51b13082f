"""The README's "run by hand" commands work as printed, from a directory outside the
checkout and without PYTHONPATH: twistd finds the cpvm plugins and ``--reactor=cpvm``
through the development install alone (an editable install once hid them)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import REPO_ROOT

_STARTING = re.compile(r"starting on (\d+)")


def _readme_commands() -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    lines = [
        line.strip() for line in text.splitlines() if re.match(r"^\S*twistd -n ", line.strip())
    ]
    return [shlex.split(line) for line in lines]


def test_readme_prints_one_command_per_daemon():
    plugins = [argv[-1] for argv in _readme_commands()]
    assert plugins == ["cpvm-manager", "cpvm"]


@pytest.mark.parametrize("plugin", ["cpvm-manager", "cpvm"])
def test_readme_command_starts_the_daemon(plugin: str, tmp_path: Path):
    argv = next(a for a in _readme_commands() if a[-1] == plugin)
    # The venv the README names is the one running these tests (CPVM_VENV may move it).
    argv[0] = str(Path(sys.executable).parent / "twistd")
    if plugin == "cpvm-manager":
        conf = f"[server]\nlisten = tcp:0:interface=127.0.0.1\ndata_dir = {tmp_path}/data\n"
    else:
        conf = (
            f"[server]\nbind = 127.0.0.1\nport = 0\nstate_directory = {tmp_path}/state\n"
            "[manager]\nurl = http://127.0.0.1:9\n"
        )
    (tmp_path / "d.conf").write_text(conf)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--config", str(tmp_path / "d.conf")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if _STARTING.search(log.read_text(errors="replace")):
                break
            time.sleep(0.1)
        text = log.read_text(errors="replace")
        assert _STARTING.search(text), text[-3000:]
        assert "does not exist" not in text and "Unknown command" not in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
