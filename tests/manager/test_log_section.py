"""The manager reads the same ``[log]`` section as cpvm and applies it to its output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpvm.common.inifile import ConfigError, IniReader
from cpvm.manager.config import parse_config
from tests.daemons import Daemon


def test_log_section_parses_like_cpvms():
    c = parse_config(
        IniReader(
            "m.conf",
            text=(
                "[log]\nformat = json\nlevel = warn\naudit_file = /var/log/cpvm/manager-audit.log\n"
            ),
        )
    )
    assert (c.log.format, c.log.level) == ("json", "warn")
    assert c.log.audit_file == Path("/var/log/cpvm/manager-audit.log")
    assert parse_config(IniReader.empty()).log.format == "text"
    with pytest.raises(ConfigError) as e:
        parse_config(IniReader("m.conf", text="[log]\nformat = xml\n"))
    assert str(e.value).startswith("m.conf: [log] format: ")


def test_running_manager_writes_json_lines_when_told(tmp_path: Path):
    config = (
        f"[server]\nlisten = tcp:0:interface=127.0.0.1\ndata_dir = {tmp_path}/data\n"
        "[log]\nformat = json\nlevel = info\n"
    )
    daemon = Daemon(
        "cpvm-manager",
        "cpvm-manager",
        config,
        workdir=tmp_path,
        extra_args=("--logger=cpvm.common.logs.observer",),
    )
    try:
        lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    finally:
        daemon.stop()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(
        "cpvm-manager" in r.get("message", "") and "starting" in r["message"] for r in records
    ), records
    assert all(r.get("level") for r in records)
