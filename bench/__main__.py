"""``python3 -m bench --quick`` (< 2 min) or ``--full`` (< 15 min): see docs/performance.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import report
from bench.run import PROFILES, SCENARIOS, Runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the default; under 2 minutes")
    mode.add_argument("--full", action="store_true", help="bigger sizes; under 15 minutes")
    parser.add_argument(
        "--proxies", help="comma-separated subset of direct,socat,websockify,cpvm (default: all)"
    )
    parser.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument(
        "--no-workers-compare", action="store_true", help="skip the cpvm workers = 2 run"
    )
    parser.add_argument(
        "--no-recording-compare",
        action="store_true",
        help="skip the cpvm run with every session recorded (cpvm-rec)",
    )
    parser.add_argument("--seconds", type=float, help="streaming time per throughput case")
    parser.add_argument("--idle-sizes", help="comma-separated idle session counts")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure the cpvm checked out in DIR (an older commit: "
        "git worktree add DIR COMMIT), as cpvm-base, in the same run",
    )
    parser.add_argument(
        "--results",
        default=str(Path(__file__).parent / "results"),
        help="directory for results (default bench/results)",
    )
    args = parser.parse_args(argv)
    profile = PROFILES["full" if args.full else "quick"]
    if args.proxies:
        profile.proxies = args.proxies.split(",")
    if args.scenarios:
        profile.scenarios = args.scenarios.split(",")
    if args.no_workers_compare or "cpvm" not in profile.proxies:
        profile.workers_compare = []
    if args.no_recording_compare or "cpvm" not in profile.proxies:
        profile.recording_compare = []
        profile.idle_large.pop("cpvm-w2", None)
    if args.baseline:
        os.environ["CPVM_BENCH_BASELINE"] = str(Path(args.baseline).resolve())
        if "cpvm-base" not in profile.proxies:  # else where --proxies put it
            profile.proxies = [*profile.proxies, "cpvm-base"]
    if args.seconds:
        profile.stream_seconds = args.seconds
    if args.idle_sizes:
        profile.idle_sizes = [int(x) for x in args.idle_sizes.split(",")]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(profile, log=lambda m: print(m, flush=True))
    run = runner.run()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = out / f"{profile.name}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(run, indent=1))
    md = [
        f"# cpvm bench, {profile.name}, {time.strftime('%Y-%m-%d %H:%M')}",
        f"{os.cpu_count()} cores; run took {run['seconds']:.0f} s; direct and socat are "
        "TCP-level (raw RFB), websockify and cpvm WebSocket (binary frames).",
        "",
        report.table(run, profile.multi_sessions),
        "",
        "## Targets",
        "",
        report.targets_markdown(run),
    ]
    if run["notes"]:
        md += ["", "## Notes", ""] + [f"- {n}" for n in run["notes"]]
    text = "\n".join(md) + "\n"
    base.with_suffix(".md").write_text(text)
    report.chart(run, base.with_suffix(".png"), profile.multi_sessions)
    for suffix in (".md", ".png", ".json"):
        latest = out / f"latest{suffix}"
        latest.write_bytes(base.with_suffix(suffix).read_bytes())
    print(text)
    print(f"results: {base}.md / .png / .json (copied to {out}/latest.*)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
