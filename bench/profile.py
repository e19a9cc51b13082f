"""Profile cpvm under one bench workload with py-spy: ``python3 -m bench.profile stream``.

Workloads: ``stream`` (one flat-out session), ``setup`` (sequential session set-up),
``echo`` (KeyEvent round trips). Writes ``bench/results/profile-<workload>.txt`` (py-spy's
raw collapsed stacks) and prints the functions with the largest share of samples, by own
time (leaf) and inclusive.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

from bench import workloads
from bench.proxies import Cpvm, new_workdir
from bench.run import RfbServer
from bench.workloads import Worker


def summarize(raw: Path, top: int = 25) -> str:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].split("/")[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{total} samples", "", "own time:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out += ["", "inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    workload = argv[0] if argv else "stream"
    seconds = float(argv[1]) if len(argv) > 1 else 8.0
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    wd = new_workdir()
    server = RfbServer(wd)
    proxy = Cpvm(server.ports, wd)
    proxy.start()
    try:
        if workload == "stream":
            w = Worker(workloads.stream, proxy.targets("stream", 1), seconds + 2)
        elif workload == "echo":
            w = Worker(
                workloads.echo_interleaved,
                {"cpvm": proxy.targets("echo", 1)[0]},
                int(seconds * 4000),
            )
        else:
            w = Worker(workloads.setup_sequential, proxy.targets("idle", int(seconds * 250)))
        w.recv(60)
        w.send("go")
        raw = results / f"profile-{workload}.txt"
        subprocess.run(
            [
                "py-spy",
                "record",
                "--pid",
                str(proxy.pids()[0]),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--format",
                "raw",
                "--nonblocking",
                "-o",
                str(raw),
            ],
            check=True,
            capture_output=True,
        )
        try:
            w.recv(120)
        finally:
            w.join()
        print(summarize(raw))
    finally:
        proxy.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
