"""Where one cpvm session set-up spends its time: ``python3 -m bench.setup_profile [N]``.

Runs the sequential set-up (TCP connect + WebSocket upgrade + token redemption + upstream
RFB handshake + relayed RFB handshake to the end of ServerInit, then close) and splits it:

* **legs timed from outside**, one at a time, N each: the upstream RFB handshake alone
  (client straight to the synthetic server), the manager's ``/proxy/v1/redeem`` alone (a
  keep-alive HTTP client with cpvm's proxy key, on freshly minted tokens), the
  ``/proxy/v1/sessions/<id>/end`` report alone, and the whole set-up through cpvm;
* **CPU per set-up** of cpvm and of the manager (psutil, user + sys) during the whole
  set-up run;
* **where that CPU goes**: py-spy (``--gil``: only samples holding the GIL, i.e. Python
  work, not waits) on cpvm and on the manager at once, printed as µs per set-up per
  function, own time and inclusive.

Prints a report and writes ``bench/results/setup-profile.txt`` plus py-spy's raw stacks.
"""

from __future__ import annotations

import collections
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import accounting, workloads
from bench.proxies import HOST, Cpvm, new_workdir
from bench.rfbclient import BlockingSession, Target
from bench.run import RfbServer, percentile
from bench.workloads import Worker

RATE = 1000  # py-spy samples per second


def _stacks(raw: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = []
        for f in stack.split(";"):
            if " (" in f:
                name, _, where = f.partition(" (")
                path = where.split(":")[0]
                # Keep cpvm's own files recognisable (cpvm/proxy/session.py vs twisted's).
                if path.startswith("cpvm/"):
                    short = path
                elif "/cpvm/" in path:
                    short = "cpvm/" + path.rsplit("/cpvm/", 1)[1]
                else:
                    short = path.split("/")[-1]
                f = f"{name} ({short})"
            frames.append(f)
        out.append((frames, int(count)))
    return out


_PLUMBING = (
    "<module>",
    "_run_",
    "runApp",
    "runReactorWithLogging",
    "run (",
    "ApplicationRunner",
    "UnixApplicationRunner",
    "_SomeApplicationRunner",
    "main (",
    "Runner.",
    "Twist.",
    "ReactorBase.",
    "EPollReactor.doPoll",
    "callWithLogger",
    "callWithContext",
    "ThreadedContextTracker",
    "ContextTracker",
    "_PollLikeMixin",
    "Thread.",
    "_bootstrap",
    "ThreadWorker",
    "Team.",
    "LockWorker",
    "ThreadPool.",
    "Deferred.",
    "_inlineCallbacks",
    "_gotResultInlineCallbacks",
    "_cancellableInlineCallbacks",
    "Connection.doRead",
    "Connection._dataReceived",
)


def per_setup(raw: Path, setups: int, top: int = 30) -> str:
    """py-spy samples as µs of GIL-holding time per set-up, own and inclusive."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for frames, n in _stacks(raw):
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    us = 1e6 / RATE / max(setups, 1)
    # Each sample charged to the innermost cpvm function on its stack (the cpvm code that
    # is responsible for the library work below it); stacks without cpvm code go to their
    # first frame below the reactor's dispatch.
    owner: collections.Counter = collections.Counter()
    for frames, n in _stacks(raw):
        mine = [f for f in frames if "(cpvm/" in f]
        if mine:
            owner[mine[-1]] += n
        else:
            tail = [f for f in frames if not f.startswith(_PLUMBING)]
            owner["(no cpvm frame) " + (tail[0] if tail else frames[-1])] += n
    lines = [
        f"  {total} samples = {total * us:.0f} µs per set-up holding the GIL",
        "  by responsible function (innermost cpvm frame, library calls below it included):",
    ]
    lines += [f"    {c * us:7.0f} µs  {f}" for f, c in owner.most_common(top)]
    lines += ["  own:"]
    lines += [f"    {c * us:7.0f} µs  {f}" for f, c in own.most_common(top)]
    lines += ["  inclusive:"]
    lines += [
        f"    {c * us:7.0f} µs  {f}"
        for f, c in incl.most_common(top)
        if not f.startswith(
            ("<module>", "_run_", "Runner.", "Twist.", "ReactorBase.", "run (", "main (")
        )
    ]
    return "\n".join(lines)


def _timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times


def _ms(times: list[float]) -> str:
    return (
        f"p50 {percentile(times, 50) * 1e3:.2f} ms, p90 {percentile(times, 90) * 1e3:.2f}"
        f" ms, p99 {percentile(times, 99) * 1e3:.2f} ms"
    )


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1000
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    wd = new_workdir()
    server = RfbServer(wd)
    proxy = Cpvm(server.ports, wd)
    proxy.start()
    report: list[str] = [f"# cpvm set-up profile, {n} sequential set-ups per leg", ""]
    try:
        key = (Path(proxy.manager_conf).parent / "proxy.key").read_text().strip()
        headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
        conn = http.client.HTTPConnection(HOST, proxy.manager_port, timeout=10)

        def post(path: str, body: dict) -> tuple[int, dict]:
            conn.request("POST", path, json.dumps(body), headers)
            r = conn.getresponse()
            data = r.read()
            return r.status, json.loads(data) if data else {}

        mgr = proxy.manager_pids()
        cpvm = proxy.pids()

        # 1. The upstream leg alone: the synthetic server's RFB handshake, straight.
        def direct():
            s = BlockingSession(Target("tcp", HOST, server.ports["idle"]))
            s.handshake()
            s.close()

        _timed(direct, 50)
        t_direct = _timed(direct, n)

        # 2. The manager's redemption alone (what cpvm waits for), then the end report.
        tokens = [t.path.split("token=")[1] for t in proxy.targets("idle", n + 50)]
        tokens = [__import__("urllib.parse").parse.unquote(t) for t in tokens]
        sessions: list[str] = []

        def redeem():
            status, body = post(
                "/proxy/v1/redeem", {"token": tokens.pop(), "extra": None, "client_address": HOST}
            )
            assert status == 200, (status, body)
            sessions.append(body["session_id"])

        _timed(redeem, 50)
        cpu0 = accounting.cpu_seconds(mgr)
        t_redeem = _timed(redeem, n)
        mgr_redeem_ms = (accounting.cpu_seconds(mgr) - cpu0) / n * 1e3

        def end():
            status, _ = post(
                f"/proxy/v1/sessions/{sessions.pop()}/end",
                {
                    "reason": "client_closed",
                    "client_address": HOST,
                    "bytes_to_client": 1,
                    "bytes_to_server": 1,
                    "duration": 0.01,
                },
            )
            assert status == 204, status

        cpu0 = accounting.cpu_seconds(mgr)
        t_end = _timed(end, n)
        mgr_end_ms = (accounting.cpu_seconds(mgr) - cpu0) / n * 1e3
        conn.close()

        # 3. The whole set-up through cpvm, with py-spy on cpvm and on the manager.
        targets = proxy.targets("idle", n)
        w = Worker(workloads.setup_sequential, targets)
        w.recv(60)
        raws = {name: results / f"setup-profile-{name}.txt" for name in ("cpvm", "manager")}
        spies = {
            name: subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(pids[0]),
                    "--rate",
                    str(RATE),
                    "--gil",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "-o",
                    str(raws[name]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pids in (("cpvm", cpvm), ("manager", mgr))
        }
        time.sleep(1.0)  # py-spy attaches
        window = accounting.CpuWindow({"cpvm": cpvm, "manager": mgr})
        window.start()
        w.send("go")
        res = w.recv(600)
        cpu = window.stop()
        w.join()
        time.sleep(1.0)  # the last end reports reach the manager
        for p in spies.values():
            p.send_signal(2)  # SIGINT: py-spy writes its output and exits
        for p in spies.values():
            p.wait(30)
        t_full = res["times"]
        done = len(t_full)
        report += [
            "## Legs, timed one at a time from outside",
            "",
            f"- whole set-up through cpvm:      {_ms(t_full)}  "
            f"({done / res['seconds']:.0f} set-ups/s, {res['failures']} failures)",
            f"- upstream RFB handshake alone:   {_ms(t_direct)}",
            f"- manager redeem alone:           {_ms(t_redeem)}  "
            f"(manager CPU {mgr_redeem_ms:.2f} ms per redeem)",
            f"- manager end report alone:       {_ms(t_end)}  "
            f"(manager CPU {mgr_end_ms:.2f} ms per report)",
            "",
            "## CPU per set-up during the whole-set-up run (psutil user + sys)",
            "",
            f"- cpvm:    {cpu['cpvm'] / done * 1e3:.2f} ms",
            f"- manager: {cpu['manager'] / done * 1e3:.2f} ms (redeem + end report, "
            "cpvm's heartbeats)",
            f"- client:  {res['client_cpu'] / done * 1e3:.2f} ms",
            "",
            f"## cpvm, py-spy --gil at {RATE} Hz, µs per set-up",
            "",
            per_setup(raws["cpvm"], done),
            "",
            f"## manager, py-spy --gil at {RATE} Hz, µs per set-up",
            "",
            per_setup(raws["manager"], done),
        ]
    finally:
        proxy.stop()
        server.stop()
    text = "\n".join(report) + "\n"
    (results / "setup-profile.txt").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
