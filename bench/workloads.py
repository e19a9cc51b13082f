"""Client workloads, each run in its own forked process so its CPU is measured apart.

Every workload follows one protocol on its pipe: prepare (connect, warm up), send
``("ready", info)``, wait for ``"go"``, measure, send ``("result", dict)``. Each result
carries ``client_cpu``: the process's own user+sys CPU seconds during the measurement.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import selectors
import time
import traceback

from bench.rfbclient import FB_UPDATE_REQUEST, AsyncSession, BlockingSession, Target, key_event
from bench.rfbserver import raise_fd_limit

_ctx = mp.get_context("fork")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


class Worker:
    """A forked client process running ``fn(conn, *args)``."""

    def __init__(self, fn, *args):
        self.conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_run, args=(fn, child, args), daemon=True)
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def recv(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError("client worker did not answer")
        kind, value = self.conn.recv()
        if kind == "error":
            raise RuntimeError(f"client worker failed:\n{value}")
        return value

    def send(self, msg) -> None:
        self.conn.send(msg)

    def join(self) -> None:
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def _run(fn, conn, args) -> None:
    try:
        raise_fd_limit()
        fn(conn, *args)
    except BaseException:
        conn.send(("error", traceback.format_exc()))


# --- throughput ------------------------------------------------------------------------------


def stream(conn, targets: list[Target], seconds: float) -> None:
    """Read flat-out streams on ``targets`` for ``seconds``; count RFB payload bytes."""
    sessions = []
    for t in targets:
        s = BlockingSession(t)
        s.handshake()
        s.send(FB_UPDATE_REQUEST)
        sessions.append(s)
    if len(sessions) == 1:
        s = sessions[0]
        s.stream_for(0.3)  # warm up: buffers full, steady state
        conn.send(("ready", 1))
        conn.recv()
        cpu = _cpu()
        nbytes, elapsed = s.stream_for(seconds)
        cpu = _cpu() - cpu
    else:
        sel = selectors.DefaultSelector()
        for s in sessions:
            s.sock.setblocking(False)
            sel.register(s.sock, selectors.EVENT_READ, s)

        def pump(duration: float) -> int:
            # One zero-copy step per readable socket and turn: fair, and a socket that
            # was just emptied is not asked again before it is readable.
            total = 0
            end = time.perf_counter() + duration
            while time.perf_counter() < end:
                for key, _ in sel.select(0.5):
                    s = key.data
                    try:
                        total += s.skim()
                    except BlockingIOError:
                        continue
                    if s.closed:
                        sel.unregister(s.sock)
            return total

        pump(0.3)
        conn.send(("ready", len(sessions)))
        conn.recv()
        cpu = _cpu()
        start = time.perf_counter()
        nbytes = pump(seconds)
        elapsed = time.perf_counter() - start
        cpu = _cpu() - cpu
    for s in sessions:
        s.close()
    conn.send(("result", {"bytes": nbytes, "seconds": elapsed, "client_cpu": cpu}))


# --- latency ---------------------------------------------------------------------------------


def echo_interleaved(
    conn, targets: dict[str, Target], rounds: int, block: int = 250, cold_rounds: int = 0
) -> None:
    """KeyEvent -> Bell round trips through every target, one at a time.

    ``rounds`` per target in blocks of ``block`` back-to-back rounds, the targets taking
    turns block by block (the order rotates), so every relay sees the same machine noise
    over the run; the first rounds of a block are warm-up, not samples. Then
    ``cold_rounds`` per target one round each in turn: every relay has been idle for the
    others' rounds, as between a person's keystrokes. Returns the sorted samples (seconds)
    per target, and per target the cold ones.
    """
    sessions = {}
    for name, target in targets.items():
        s = BlockingSession(target)
        s.handshake()
        sessions[name] = s
    down = key_event(1, 0x61)
    clock = time.perf_counter

    def round_trip(s: BlockingSession) -> float:
        t0 = clock()
        s.send(down)
        s.read(1)
        return clock() - t0

    for s in sessions.values():
        for _ in range(200):
            round_trip(s)
    conn.send(("ready", 1))
    conn.recv()
    order = list(sessions.items())
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    cold: dict[str, list[float]] = {name: [] for name in sessions}
    warm_up = min(10, block // 10)
    for b in range(-(-rounds // block)):
        k = b % len(order)
        for name, s in order[k:] + order[:k]:
            for _ in range(warm_up):
                round_trip(s)
            n = min(block, rounds - len(samples[name]))
            samples[name].extend(round_trip(s) for _ in range(n))
    for i in range(cold_rounds):
        k = i % len(order)
        for name, s in order[k:] + order[:k]:
            cold[name].append(round_trip(s))
    for s in sessions.values():
        s.close()
    for values in (*samples.values(), *cold.values()):
        values.sort()
    conn.send(("result", {"samples": samples, "cold": cold}))


# --- session set-up --------------------------------------------------------------------------


def setup_sequential(conn, targets: list[Target]) -> None:
    """Open sessions one after the other (TCP connect + upgrade + RFB up to ServerInit)."""
    conn.send(("ready", len(targets)))
    conn.recv()
    cpu = _cpu()
    times = []
    failures = 0
    start = time.perf_counter()
    for t in targets:
        t0 = time.perf_counter()
        try:
            s = BlockingSession(t)
            s.handshake()
            times.append(time.perf_counter() - t0)
            s.close()
        except OSError:
            failures += 1
    elapsed = time.perf_counter() - start
    cpu = _cpu() - cpu
    times.sort()
    conn.send(
        ("result", {"times": times, "seconds": elapsed, "failures": failures, "client_cpu": cpu})
    )


def setup_concurrent(conn, targets: list[Target], concurrency: int) -> None:
    """Open sessions ``concurrency`` at a time, each closed once it reached ServerInit."""

    async def main():
        queue = list(reversed(targets))
        times: list[float] = []
        failures = 0

        async def one_by_one():
            nonlocal failures
            while queue:
                t = queue.pop()
                t0 = time.perf_counter()
                s = AsyncSession(t)
                try:
                    await asyncio.wait_for(s.handshake(), 30)
                    times.append(time.perf_counter() - t0)
                except (TimeoutError, OSError, asyncio.IncompleteReadError):
                    failures += 1
                finally:
                    s.close()

        start = time.perf_counter()
        await asyncio.gather(*(one_by_one() for _ in range(concurrency)))
        return times, failures, time.perf_counter() - start

    conn.send(("ready", len(targets)))
    conn.recv()
    cpu = _cpu()
    times, failures, elapsed = asyncio.run(main())
    cpu = _cpu() - cpu
    times.sort()
    conn.send(
        ("result", {"times": times, "seconds": elapsed, "failures": failures, "client_cpu": cpu})
    )


# --- idle sessions ---------------------------------------------------------------------------


def idle(conn, targets: list[Target], concurrency: int = 200) -> None:
    """Open and hold idle sessions until told to close them; report how many stayed open."""

    async def main():
        sessions: list[AsyncSession] = []
        queue = list(reversed(targets))
        errors: list[str] = []

        async def opener():
            while queue:
                s = AsyncSession(queue.pop())
                try:
                    await asyncio.wait_for(s.handshake(), 60)
                    s.keep_alive()
                    sessions.append(s)
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                    s.close()
                    if len(errors) < 5:
                        errors.append(repr(e)[:200])

        start = time.perf_counter()
        await asyncio.gather(*(opener() for _ in range(concurrency)))
        opened = time.perf_counter() - start
        await asyncio.sleep(1.0)  # let late refusals and closes arrive
        loop = asyncio.get_running_loop()
        conn.send(("ready", {"opened": len(sessions), "open_seconds": opened, "errors": errors}))
        await loop.run_in_executor(None, conn.recv)
        alive = sum(1 for s in sessions if s.alive)
        for s in sessions:
            s.close()
        await asyncio.sleep(0.2)
        return alive

    alive = asyncio.run(main())
    conn.send(("result", {"alive": alive, "client_cpu": _cpu()}))


# --- slow reader -----------------------------------------------------------------------------


def slow_reader(conn, target: Target, seconds: float, rate: int) -> None:
    """Read ``rate`` bytes/s from a flat-out stream; send one KeyEvent halfway through."""
    s = BlockingSession(target)
    s.handshake()
    s.send(FB_UPDATE_REQUEST)
    s.sock.settimeout(5)
    conn.send(("ready", 1))
    conn.recv()
    start = time.perf_counter()
    got = 0
    sent_key_at = None
    tick = 0.05
    step = int(rate * tick)
    stop = False
    while not stop:
        now = time.perf_counter() - start
        if now >= seconds:
            break
        if sent_key_at is None and now >= seconds / 2:
            s.send(key_event(1, 0x62))
            sent_key_at = now
            conn.send(("key", now))
        want = step
        while want > 0:
            chunk = s.sock.recv(min(want, 65536))
            if not chunk:
                stop = True
                break
            want -= len(chunk)
            got += len(chunk)
        if conn.poll():
            if conn.recv() == "stop":
                break
        time.sleep(max(0.0, tick - ((time.perf_counter() - start) - now)))
    s.close()
    conn.send(
        ("result", {"bytes": got, "seconds": time.perf_counter() - start, "client_cpu": _cpu()})
    )
