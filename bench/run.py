"""Runs every scenario against every relay, in one process tree, and collects the figures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import accounting, workloads
from bench.proxies import Cpvm, Proxy, make_proxy, new_workdir, wait_until
from bench.rfbserver import raise_fd_limit
from bench.workloads import Worker

MB = 1e6
IDLE_PER_CLIENT = 5000  # idle sessions per client process (its descriptors)


@dataclass
class Profile:
    """Sizes of one run; ``quick`` stays under 2 minutes, ``full`` under 15."""

    name: str
    proxies: list[str]
    stream_seconds: float
    multi_sessions: int
    multi_procs: int
    rounds: int
    setup_sequential: int
    setup_concurrent: int
    concurrency: int
    idle_sizes: list[int]
    idle_large: dict[str, list[int]]  # extra sizes for some proxies only
    slow_seconds: float
    slow_rate: int = 100_000
    workers_compare: list[str] = field(default_factory=lambda: ["cpvm-w2"])
    # cpvm with every session recorded: throughput and CPU per MB next to cpvm's own.
    recording_compare: list[str] = field(default_factory=lambda: ["cpvm-rec"])
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))


SCENARIOS = ("throughput", "multi", "latency", "setup", "idle", "slow")

PROFILES = {
    "quick": Profile(
        "quick",
        ["direct", "socat", "websockify", "cpvm"],
        1.5,
        8,
        2,
        1000,
        100,
        200,
        16,
        [100],
        {},
        4.0,
    ),
    "full": Profile(
        "full",
        ["direct", "socat", "websockify", "cpvm"],
        5.0,
        16,
        2,
        10000,
        1000,
        2000,
        32,
        [100, 1000],
        {"cpvm": [10000], "cpvm-w2": [10000]},
        10.0,
    ),
}


class RfbServer:
    """The synthetic RFB server process (bench.rfbserver)."""

    def __init__(self, workdir: Path):
        ports_file = workdir / "server-ports.json"
        self.log = open(workdir / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.rfbserver", "--ports-file", str(ports_file)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_until(ports_file.exists, 15, "synthetic RFB server", self.proc)
        self.ports = json.loads(ports_file.read_text())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.ports["control"]), timeout=5) as s:
            s.sendall(b"stats\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        return json.loads(data)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q / 100 * (len(sorted_values) - 1)))))
    return sorted_values[i]


class Runner:
    def __init__(self, profile: Profile, log=print):
        self.p = profile
        self.log = log
        self.workdir = new_workdir()
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []

    # -- helpers -----------------------------------------------------------------------------

    def _proxy(self, name: str) -> Proxy:
        proxy = make_proxy(name, self.server.ports, self.workdir)
        proxy.start()
        return proxy

    def _measure(
        self, proxy: Proxy, workers: list[Worker], timeout: float, on_ready=None
    ) -> tuple[list, dict]:
        """ready -> snapshot -> go -> results -> snapshot."""
        for w in workers:
            w.recv(timeout)
        if on_ready is not None:
            on_ready()
        sent0 = self.server.stats()["bytes_sent"]
        window = accounting.CpuWindow({"proxy": proxy.pids(), "server": [self.server.pid]})
        window.start()
        t0 = time.perf_counter()
        for w in workers:
            w.send("go")
        results = [w.recv(timeout) for w in workers]
        cpu = window.stop()
        cpu["wall"] = time.perf_counter() - t0
        # Stream bytes the server sent in the window (it contains the clients' windows).
        cpu["server_sent"] = self.server.stats()["bytes_sent"] - sent0
        cpu["client"] = sum(r["client_cpu"] for r in results)
        for w in workers:
            w.join()
        return results, cpu

    @staticmethod
    def _cpu_fields(prefix: str, cpu: dict, out: dict) -> None:
        wall = cpu["wall"] or 1e-9
        for who in ("proxy", "server", "client"):
            out[f"{prefix}_cpu_{who}"] = cpu[who] / wall  # cores busy

    def _bytes_check(self, prefix: str, counted: float, cpu: dict, out: dict) -> None:
        """Payload the clients counted ÷ what the server sent: ~1.00 (what sits in socket
        and relay buffers differs between the two snapshots), else the counting is wrong."""
        sent = cpu["server_sent"]
        out[f"{prefix}_counted_per_sent"] = counted / sent if sent else float("nan")
        if sent and abs(counted / sent - 1) > 0.05:
            self.notes.append(
                f"{prefix}: clients counted {counted / MB:.0f} MB, the server "
                f"sent {sent / MB:.0f} MB"
            )

    # -- scenarios -----------------------------------------------------------------------------

    def throughput(self, proxy: Proxy, r: dict) -> None:
        targets = proxy.targets("stream", 1)
        w = Worker(workloads.stream, targets, self.p.stream_seconds)
        (res,), cpu = self._measure(proxy, [w], 60)
        mb = res["bytes"] / MB
        r["tp1_MBps"] = mb / res["seconds"]
        r["tp1_proxy_cpu_s_per_GB"] = cpu["proxy"] / mb * 1000 if mb else float("nan")
        self._cpu_fields("tp1", cpu, r)
        self._bytes_check("tp1", res["bytes"], cpu, r)

    def multi(self, proxy: Proxy, r: dict) -> None:
        n, procs = self.p.multi_sessions, self.p.multi_procs
        targets = proxy.targets("stream", n)
        workers = [
            Worker(workloads.stream, targets[i::procs], self.p.stream_seconds) for i in range(procs)
        ]
        each0 = accounting.cpu_by_process(proxy.pids())

        def count_fds():
            # Descriptors per proxy process while streaming: how SO_REUSEPORT spread them.
            r["tpN_proxy_fds_each"] = list(accounting.fds_by_process(proxy.pids()).values())

        results, cpu = self._measure(proxy, workers, 120, count_fds)
        each1 = accounting.cpu_by_process(proxy.pids())
        # Cores busy per proxy process: with workers = 2, whether both carried the load.
        r["tpN_proxy_cores_each"] = [
            round((each1[pid] - each0.get(pid, 0.0)) / cpu["wall"], 2) for pid in each1
        ]
        total = sum(x["bytes"] for x in results) / MB
        seconds = max(x["seconds"] for x in results)
        r["tpN_MBps"] = total / seconds
        r["tpN_proxy_cpu_s_per_GB"] = cpu["proxy"] / total * 1000 if total else float("nan")
        # The machine's ceiling for this workload: every core busy with proxy, server and
        # client work at this run's CPU seconds per GB of each.
        per_gb = (cpu["proxy"] + cpu["server"] + cpu["client"]) / total * 1000 if total else 0
        r["tpN_cpu_ceiling_MBps"] = (os.cpu_count() or 1) / per_gb * 1000 if per_gb else None
        r["tpN_proxy_processes"] = accounting.memory(proxy.pids(), full=False)["processes"]
        self._cpu_fields("tpN", cpu, r)
        self._bytes_check("tpN", total * MB, cpu, r)

    def latency(self, names: list[str]) -> None:
        """Round trips through every relay in one client, the relays taking turns block
        by block, every process on one CPU.

        On a virtual machine a round trip between processes on different CPUs mostly
        measures how fast an idle virtual CPU wakes up (≈ 80 µs here, or ≈ 10 µs when
        the other CPU happens to be busy), and which CPU each process runs on changes from
        run to run. On one CPU a round trip is the relay's own work plus the same context
        switches for every relay. Taking turns gives every relay the same machine noise
        (one relay after the other, a busy minute would land on one of them). Then round
        trips after idle (see echo_interleaved).
        """
        cpu = {min(os.sched_getaffinity(0))}
        everywhere = os.sched_getaffinity(self.server.pid)
        proxies = {}
        try:
            os.sched_setaffinity(self.server.pid, cpu)
            for name in names:
                proxies[name] = self._proxy(name)
                # socat and websockify fork per connection: children inherit it.
                for pid in proxies[name].pids():
                    os.sched_setaffinity(pid, cpu)
            targets = {name: proxy.targets("echo", 1)[0] for name, proxy in proxies.items()}
            cold_rounds = self.p.rounds // 5
            w = Worker(workloads.echo_interleaved, targets, self.p.rounds, 250, cold_rounds)
            os.sched_setaffinity(w.pid, cpu)
            w.recv(120)
            w.send("go")
            res = w.recv(120 + self.p.rounds * len(names) / 1000)
            w.join()
        finally:
            for proxy in proxies.values():
                proxy.stop()
            os.sched_setaffinity(self.server.pid, everywhere)
        for name, s in res["samples"].items():
            r = self.results.setdefault(name, {})
            for q in (50, 90, 99):
                r[f"rtt_p{q}_us"] = percentile(s, q) * 1e6
            cold = res["cold"][name]
            r["rtt_cold_p50_us"] = percentile(cold, 50) * 1e6
            r["rtt_cold_p99_us"] = percentile(cold, 99) * 1e6

    def setup(self, proxy: Proxy, r: dict) -> None:
        mint0 = getattr(proxy, "mint_seconds", 0.0)
        targets = proxy.targets("idle", self.p.setup_sequential)
        if isinstance(proxy, Cpvm):
            minted = proxy.mint_seconds - mint0
            r["mint_per_s"] = len(targets) / minted
        w = Worker(workloads.setup_sequential, targets)
        (res,), cpu = self._measure(proxy, [w], 300)
        done = len(res["times"])
        r["setup_seq_per_s"] = done / res["seconds"]
        r["setup_seq_p50_ms"] = percentile(res["times"], 50) * 1e3
        r["setup_seq_p99_ms"] = percentile(res["times"], 99) * 1e3
        r["setup_seq_failures"] = res["failures"]
        r["setup_seq_proxy_cpu_ms"] = cpu["proxy"] / max(done, 1) * 1e3
        if isinstance(proxy, Cpvm):
            # Minting is serial per session in a real deployment's API client: report the
            # rate of "mint + open" as one figure as well.
            per = 1 / r["setup_seq_per_s"] + 1 / r["mint_per_s"]
            r["setup_seq_incl_mint_per_s"] = 1 / per
        targets = proxy.targets("idle", self.p.setup_concurrent)
        w = Worker(workloads.setup_concurrent, targets, self.p.concurrency)
        (res,), cpu = self._measure(proxy, [w], 300)
        r["setup_conc_per_s"] = len(res["times"]) / res["seconds"]
        r["setup_conc_p99_ms"] = percentile(res["times"], 99) * 1e3
        r["setup_conc_failures"] = res["failures"]
        self._cpu_fields("setup_conc", cpu, r)

    def idle(self, name: str, r: dict, sizes: list[int]) -> None:
        for n in sizes:
            proxy = self._proxy(name)
            try:
                warm = proxy.targets("idle", 10)
                w = Worker(workloads.setup_sequential, warm)
                self._measure(proxy, [w], 60)
                time.sleep(0.3)
                before = accounting.memory(proxy.pids())
                targets = proxy.targets("idle", n)
                # A client process holds one descriptor per session, the same hard limit
                # applies to it: spread large sizes over several client processes.
                procs = max(1, -(-n // IDLE_PER_CLIENT))
                clients = [Worker(workloads.idle, targets[i::procs]) for i in range(procs)]
                infos = [c.recv(120 + n / 50) for c in clients]
                after = accounting.memory(proxy.pids())
                fds = accounting.fds_by_process(proxy.pids())
                for c in clients:
                    c.send("go")
                alive = sum(c.recv(120)["alive"] for c in clients)
                for c in clients:
                    c.join()
                info = {
                    "opened": sum(i["opened"] for i in infos),
                    "open_seconds": max(i["open_seconds"] for i in infos),
                    "errors": [e for i in infos for e in i["errors"]],
                }
                opened = info["opened"]
                r[f"idle{n}_opened"] = opened
                r[f"idle{n}_alive"] = alive
                r[f"idle{n}_open_s"] = info["open_seconds"]
                r[f"idle{n}_client_processes"] = procs
                r[f"idle{n}_fds_each"] = sorted(fds.values(), reverse=True)
                r[f"idle{n}_processes"] = after["processes"]
                for kind in ("rss", "pss", "uss"):
                    r[f"idle{n}_{kind}_KB"] = (after[kind] - before[kind]) / max(opened, 1) / 1024
                r[f"idle{n}_total_pss_MB"] = after["pss"] / 2**20
                if info["errors"]:
                    self.notes.append(
                        f"{name} idle {n}: {opened} opened; first errors: "
                        f"{'; '.join(info['errors'][:2])}"
                    )
            finally:
                proxy.stop()

    def slow(self, proxy: Proxy, r: dict) -> None:
        targets = proxy.targets("stream", 1)
        keys_before = self.server.stats()["keys"]
        w = Worker(workloads.slow_reader, targets[0], self.p.slow_seconds, self.p.slow_rate)
        w.recv(30)
        time.sleep(0.5)  # kernel socket buffers fill first; then the relay must push back
        base = accounting.memory(proxy.pids(), full=False)["rss"]
        peak = base
        w.send("go")
        key_sent = None
        delivered_after = None
        result = None
        aborted = False
        deadline = time.monotonic() + self.p.slow_seconds + 30
        while time.monotonic() < deadline:
            if w.conn.poll(0.25):
                kind, value = w.conn.recv()
                if kind == "key":
                    key_sent = time.monotonic()
                elif kind == "result":
                    result = value
                    break
                elif kind == "error":
                    raise RuntimeError(value)
            rss = accounting.memory(proxy.pids(), full=False)["rss"]
            peak = max(peak, rss)
            if rss - base > 1 << 30 and not aborted:
                aborted = True
                w.send("stop")
            if key_sent is not None and delivered_after is None:
                if self.server.stats()["keys"] > keys_before:
                    delivered_after = time.monotonic() - key_sent
        w.join()
        if key_sent is not None and delivered_after is None:
            t_end = time.monotonic() + 3
            while time.monotonic() < t_end and delivered_after is None:
                if self.server.stats()["keys"] > keys_before:
                    delivered_after = time.monotonic() - key_sent
                time.sleep(0.05)
        r["slow_growth_MiB"] = (peak - base) / 2**20
        r["slow_aborted"] = aborted
        r["slow_key_delivered"] = delivered_after is not None
        r["slow_key_delay_ms"] = (delivered_after or float("nan")) * 1e3
        r["slow_read_KBps"] = result["bytes"] / result["seconds"] / 1e3 if result else 0.0

    # -- the run -------------------------------------------------------------------------------

    def _compare_steps(self, names: list[str]) -> dict[str, list[str]]:
        """The proxies run only for a comparison with cpvm, and their steps."""
        out: dict[str, list[str]] = {}
        for name in self.p.workers_compare:
            if "multi" in self.p.scenarios and name not in names:
                out[name] = ["multi"]
        for name in self.p.recording_compare:
            steps = [s for s in ("throughput", "multi") if s in self.p.scenarios]
            if steps and name not in names:
                out[name] = steps
        return out

    def run(self) -> dict:
        raise_fd_limit()
        started = time.time()
        self.server = RfbServer(self.workdir)
        server_cpu0 = accounting.cpu_seconds([self.server.pid])
        try:
            names = list(self.p.proxies)
            compare = self._compare_steps(names)
            for name in names + list(compare):
                r = self.results.setdefault(name, {})
                compare_only = name not in names
                t0 = time.time()
                self.log(f"== {name}")
                proxy = self._proxy(name)
                try:
                    steps = (
                        compare[name]
                        if compare_only
                        else [
                            s
                            for s in ("throughput", "multi", "setup", "slow")
                            if s in self.p.scenarios
                        ]
                    )
                    for step in steps:
                        if step == "slow" and name == "direct":
                            continue
                        t1 = time.time()
                        getattr(self, step)(proxy, r)
                        self.log(f"   {step}: {time.time() - t1:.1f}s")
                    if isinstance(proxy, Cpvm):
                        r["manager_cpu_s"] = accounting.cpu_seconds(proxy.manager_pids())
                finally:
                    proxy.stop()
                    if isinstance(proxy, Cpvm) and proxy.recordings is not None:
                        r.update(proxy.recordings_summary())
                        shutil.rmtree(proxy.recordings, ignore_errors=True)
                if "idle" in self.p.scenarios and name != "direct":
                    sizes = [] if compare_only else list(self.p.idle_sizes)
                    sizes += self.p.idle_large.get(name, [])
                    if sizes:
                        t1 = time.time()
                        self.idle(name, r, sizes)
                        self.log(f"   idle {sizes}: {time.time() - t1:.1f}s")
                self.log(f"   {name} done in {time.time() - t0:.1f}s")
            if "latency" in self.p.scenarios:
                t0 = time.time()
                self.log(f"== latency, interleaved: {', '.join(names)}")
                self.latency(names)
                self.log(f"   latency: {time.time() - t0:.1f}s")
        finally:
            server_cpu = accounting.cpu_seconds([self.server.pid]) - server_cpu0
            self.server.stop()
        return {
            "profile": self.p.name,
            "started": started,
            "seconds": time.time() - started,
            "server_cpu_s": server_cpu,
            "results": self.results,
            "notes": self.notes,
            "workdir": str(self.workdir),
        }
