"""Many idle consoles held open through the appliance, and the guest's memory meanwhile.

Used by ``bench.appliance`` (1,000 consoles) and by the suite (a few dozen). The clients are
the benchmark's (``bench.rfbclient.AsyncSession``: the WebSocket and RFB handshakes noVNC
does, then nothing but answering pings); the VNC server behind the appliance is
``bench.rfbserver``'s ``idle`` port, which completes the handshake and then says nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.rfbclient import AsyncSession, Target

# One shell command, one figure per line: cpvm's resident set (every twistd process: with
# workers there are several), MemTotal and MemAvailable, what free(1) calls used, and how
# many processes the kernel's OOM killer has killed since boot.
MEMORY_COMMAND = (
    "ps -o rss= -C twistd3 | awk '{s += $1} END {print s + 0}'; "
    "awk '/^(MemTotal|MemAvailable):/ {print $2}' /proc/meminfo; "
    "free -k | awk '/^Mem:/ {print $3}'; "
    "dmesg | grep -c 'Killed process' || true"
)


def parse_memory(output: str) -> dict[str, float]:
    """MEMORY_COMMAND's output as MiB figures (and the OOM kill count)."""
    rss, total, available, used, killed = (int(v) for v in output.split())
    return {
        "cpvm_rss_mib": round(rss / 1024, 1),
        "mem_total_mib": round(total / 1024, 1),
        "mem_available_mib": round(available / 1024, 1),
        "guest_used_mib": round(used / 1024, 1),
        "oom_kills": killed,
    }


@dataclass
class IdleConsoles:
    """How a batch of idle consoles went: opened, still open after ``while_open``, the
    first few errors, and whatever ``while_open`` returned."""

    wanted: int
    opened: int = 0
    alive: int = 0
    open_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    measured: Any = None


def hold_idle_consoles(
    port: int,
    paths: list[str],
    while_open: Callable[[], Any],
    *,
    concurrency: int = 8,
    timeout: float = 120.0,
    settle: float = 2.0,
) -> IdleConsoles:
    """Open one console per WebSocket path (``/websockify?token=…``) on 127.0.0.1:``port``,
    ``concurrency`` at a time; once all are open (and ``settle`` seconds later) call
    ``while_open()`` in a thread; then count the consoles still open and close them all.

    Blocking (it runs its own asyncio loop): call it from a thread under a Twisted test.
    QEMU's user-mode networking accepts forwarded connections with a backlog of one, so a
    high ``concurrency`` only makes clients wait out SYN retransmissions.
    """
    return asyncio.run(_hold(port, paths, while_open, concurrency, timeout, settle))


async def _hold(
    port: int,
    paths: list[str],
    while_open: Callable[[], Any],
    concurrency: int,
    timeout: float,
    settle: float,
) -> IdleConsoles:
    result = IdleConsoles(wanted=len(paths))
    sessions: list[AsyncSession] = []
    queue = list(reversed(paths))
    loop = asyncio.get_running_loop()

    async def opener() -> None:
        while queue:
            session = AsyncSession(Target("ws", "127.0.0.1", port, queue.pop()))
            try:
                await asyncio.wait_for(session.handshake(), timeout)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                session.close()
                if len(result.errors) < 5:
                    result.errors.append(repr(e)[:200])
                continue
            session.keep_alive()
            sessions.append(session)

    start = loop.time()
    try:
        await asyncio.gather(*(opener() for _ in range(concurrency)))
        result.open_seconds = round(loop.time() - start, 1)
        result.opened = len(sessions)
        await asyncio.sleep(settle)  # late refusals and closes arrive meanwhile
        result.measured = await loop.run_in_executor(None, while_open)
        result.alive = sum(1 for s in sessions if s.alive)
    finally:
        for session in sessions:
            session.close()
        await asyncio.sleep(0.2)
    return result


def guest_memory(vm: Any, ssh_key: Path) -> dict[str, float]:
    """The booted appliance's memory figures now (``vm`` an :class:`~tests.appliance.vm.
    Appliance` with SSH on the drive). Patient: under TCG, with a thousand consoles open,
    sshd takes tens of seconds to answer."""
    return parse_memory(vm.ssh(ssh_key, MEMORY_COMMAND, timeout=240, connect_timeout=180))
