"""Process-tree accounting with psutil: CPU seconds and memory of a relay's processes.

CPU counts every live process in the tree plus the CPU of children the tree has already
reaped (``children_user``/``children_system``), so forking relays (socat, websockify) are
charged for the per-connection processes that have exited too.
"""

from __future__ import annotations

import psutil


def tree(pids: list[int]) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs.append(root)
            procs.extend(root.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return procs


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for p in tree(pids):
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def cpu_by_process(pids: list[int]) -> dict[int, float]:
    """CPU seconds of each live process of the trees (a cpvm with workers: one per worker)."""
    out: dict[int, float] = {}
    for p in tree(pids):
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        out[p.pid] = t.user + t.system
    return out


def fds_by_process(pids: list[int]) -> dict[int, int]:
    """Open descriptors of each live process of the trees."""
    out: dict[int, int] = {}
    for p in tree(pids):
        try:
            out[p.pid] = p.num_fds()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return out


def memory(pids: list[int], full: bool = True) -> dict[str, float]:
    """Sum of RSS (and PSS/USS when ``full``) in bytes over the tree, and its size."""
    out = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "processes": 0}
    for p in tree(pids):
        try:
            if full:
                m = p.memory_full_info()
                out["pss"] += m.pss
                out["uss"] += m.uss
            else:
                m = p.memory_info()
            out["rss"] += m.rss
            out["processes"] += 1
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return out


class CpuWindow:
    """CPU seconds of several named process trees over one measurement window."""

    def __init__(self, groups: dict[str, list[int]]):
        self.groups = groups
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self.before = {k: cpu_seconds(v) for k, v in self.groups.items()}

    def stop(self) -> dict[str, float]:
        self.used = {k: cpu_seconds(v) - self.before[k] for k, v in self.groups.items()}
        return self.used
