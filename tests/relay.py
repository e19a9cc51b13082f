"""A TCP relay for tests that can cut every connection through it on demand.

Put it between a client (Chromium) and a server (cpvm) and call :meth:`CuttableRelay.cut`
to make a network blip: both sides of every relayed connection are aborted (a TCP reset,
no WebSocket closing handshake), exactly as when a path between them dies. New
connections are relayed as before, so a client that retries by itself gets through.

It runs in the test's reactor (Twisted's port forwarder, with its flow control); from
another thread (a Playwright worker) call :meth:`cut_from_thread`. Plain test code with
no pytest in it, like :mod:`tests.peers`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as default_reactor
from twisted.internet import threads
from twisted.protocols import portforward

from tests.peers import HOST


class _RelayedServer(portforward.ProxyServer):
    """The client's side of one relayed connection; the relay tracks it while it lives."""

    factory: "_RelayFactory"  # type: ignore[assignment]

    def connectionMade(self) -> None:  # noqa: N802
        self.factory.live.add(self)
        self.factory.accepted += 1
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802
        self.factory.live.discard(self)
        super().connectionLost(reason)


class _RelayFactory(portforward.ProxyFactory):
    protocol = _RelayedServer  # type: ignore[assignment]

    def __init__(self, host: str, port: int, reactor: Any) -> None:
        super().__init__(host, port)
        self.reactor = reactor
        self.live: set[_RelayedServer] = set()
        self.accepted = 0

    def buildProtocol(self, addr: Any) -> _RelayedServer:  # noqa: N802
        proto = super().buildProtocol(addr)
        assert isinstance(proto, _RelayedServer)
        proto.reactor = self.reactor
        return proto


class CuttableRelay:
    """Listens on ``HOST`` (port 0 unless given) and relays each connection to
    ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, *, port: int = 0, reactor=None):
        self._reactor = reactor or default_reactor
        self._factory = _RelayFactory(target_host, target_port, self._reactor)
        self._listening = self._reactor.listenTCP(port, self._factory, interface=HOST)
        self.port: int = self._listening.getHost().port

    def retarget(self, host: str, port: int) -> None:
        """Relay new connections to ``host:port`` (e.g. a server started after the relay,
        told the relay's port as its public one)."""
        self._factory.host, self._factory.port = host, port

    @property
    def live(self) -> int:
        """Connections relayed right now."""
        return len(self._factory.live)

    @property
    def accepted(self) -> int:
        """Connections accepted since the start."""
        return self._factory.accepted

    def cut(self) -> int:
        """Abort both sides of every live connection; returns how many were cut.
        Call it in the reactor thread."""
        cut = list(self._factory.live)
        for server in cut:
            peer = server.peer
            server.transport.abortConnection()
            if peer is not None:
                peer.transport.abortConnection()
        return len(cut)

    def cut_from_thread(self) -> int:
        """:meth:`cut` from a thread other than the reactor's (waits for it)."""
        return threads.blockingCallFromThread(self._reactor, self.cut)

    def stop(self) -> Any:
        """Stop listening and cut what is left; a Deferred firing when the port is closed."""
        self.cut()
        return self._listening.stopListening()
