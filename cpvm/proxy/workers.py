"""Several cpvm processes on one port, so one host uses every core.

Every process (the first one, which twistd started, and ``workers - 1`` more that it starts)
binds the same address with ``SO_REUSEPORT``; the kernel spreads new connections across
them. Sessions never move between processes, so no state is shared.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IProcessTransport, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP (optionally TLS) listening endpoint bound with ``SO_REUSEPORT``."""

    def __init__(self, reactor, port: int, interface: str, tls=None, backlog: int = 1024):
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._tls = tls
        self._backlog = backlog

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
        except OSError as e:
            return defer.fail(error.CannotListenError(self._interface, self._port, e))
        if self._tls is not None:
            factory = TLSMemoryBIOFactory(self._tls, False, factory)
        try:
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
        return defer.succeed(port)


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int):
        self.pool = pool
        self.index = index
        self.pid = 0
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason):  # noqa: N802
        self.pool._ended(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """Starts the extra worker processes, restarts one that dies, stops them with us."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        count: int,
        argv: list[str],
        grace: float,
        on_exit: Callable[[int], None] = lambda pid: None,
    ):
        self._reactor = reactor
        self._on_exit = on_exit
        self._count = count
        self._argv = argv
        self._grace = grace
        self._running: dict[int, tuple[_WorkerProtocol, IProcessTransport]] = {}
        self._restarts = 0

    def startService(self):  # noqa: N802
        super().startService()
        for index in range(1, self._count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        proto = _WorkerProtocol(self, index)
        argv = [sys.executable, *self._argv, "--worker", str(index)]
        transport = self._reactor.spawnProcess(
            proto, sys.executable, argv, env=os.environ.copy(), childFDs={0: "w", 1: 1, 2: 2}
        )
        proto.pid = transport.pid  # the transport forgets it once the process ended
        self._running[index] = (proto, transport)
        self._log.info("started worker {index} (pid {pid})", index=index, pid=transport.pid)

    @property
    def pids(self) -> list[int]:
        return [t.pid for _, t in self._running.values() if t.pid]

    def signal_all(self, name: str) -> None:
        for _, transport in list(self._running.values()):
            try:
                transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def _ended(self, proto: _WorkerProtocol, reason) -> None:
        self._running.pop(proto.index, None)
        self._on_exit(proto.pid)
        if not self.running:
            return
        self._restarts += 1
        delay = min(30.0, 0.5 * self._restarts)
        self._log.warn(
            "worker {index} exited ({why}); restarting in {delay:.1f} s",
            index=proto.index,
            why=reason.value,
            delay=delay,
        )
        self._reactor.callLater(delay, self._respawn, proto.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self._running:
            self._spawn(index)

    def stopService(self):  # noqa: N802
        super().stopService()
        waits = []
        for proto, transport in list(self._running.values()):
            try:
                transport.signalProcess("TERM")
            except error.ProcessExitedAlready:
                continue
            d = proto.ended
            waits.append(d)
            kill = self._reactor.callLater(self._grace + 5, _kill, transport)
            d.addBoth(lambda r, k=kill: (k.cancel() if k.active() else None, r)[1])
        return defer.DeferredList(waits)


def _kill(transport) -> None:
    try:
        transport.signalProcess(signal.SIGKILL)
    except error.ProcessExitedAlready:
        pass
