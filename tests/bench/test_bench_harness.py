"""The benchmark harness runs its smallest case end to end and writes a table with numbers.

No timing assertions: the figures depend on the machine; this only checks that every relay
starts, that sessions stream through each of them and that the report is produced.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


def _available(module: str) -> bool:
    return (
        subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode
        == 0
    )


@pytest.mark.integration
def test_smallest_case_produces_a_table(tmp_path):
    for module in ("psutil", "matplotlib", "websockify"):
        if not _available(module):
            pytest.skip(
                f"{module} not installed (pip install websockify==0.13.0 psutil matplotlib)"
            )
    if shutil.which("socat") is None:
        pytest.skip("socat not installed")
    proxies = "direct,socat,websockify,cpvm"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--proxies",
            proxies,
            "--scenarios",
            "throughput,latency",
            "--seconds",
            "1",
            "--no-workers-compare",
            "--results",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = (tmp_path / "latest.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| Throughput, 1 session"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:5]
    assert all(re.fullmatch(r"\d+", c) and int(c) > 0 for c in cells), row
    run = json.loads((tmp_path / "latest.json").read_text())
    for name in proxies.split(","):
        assert run["results"][name]["tp1_MBps"] > 0
        # Round trips through every relay, taking turns, and after idle.
        assert 0 < run["results"][name]["rtt_p50_us"] <= run["results"][name]["rtt_p99_us"]
        assert run["results"][name]["rtt_cold_p99_us"] > 0
    assert (tmp_path / "latest.png").stat().st_size > 1000
