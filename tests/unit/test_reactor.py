"""cpvm's reactor: I/O handlers are called without a log context, yet an error in one is
logged and the others are still served."""

from __future__ import annotations

import socket

from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher

from cpvm.proxy.reactor import RelayReactor


class Reader:
    """A minimal readable selectable over one end of a socket pair."""

    def __init__(self, sock: socket.socket, fail: bool):
        self.sock = sock
        self.fail = fail
        self.reads = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:  # noqa: N802
        return "Reader"

    def doRead(self):  # noqa: N802
        self.reads += 1
        self.sock.recv(100)
        return ConnectionDone() if self.fail else None

    def connectionLost(self, reason):  # noqa: N802
        if self.fail:
            raise RuntimeError("a handler that breaks")


def test_an_error_in_one_handler_is_logged_and_the_others_run():
    reactor = RelayReactor()
    pairs = [socket.socketpair() for _ in range(2)]
    broken, fine = Reader(pairs[0][0], fail=True), Reader(pairs[1][0], fail=False)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for reader in (broken, fine):
            reactor.addReader(reader)
        for _, other in pairs:
            other.send(b"x")
        reactor.doPoll(1)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for pair in pairs:
            for s in pair:
                s.close()
        reactor._poller.close()
    assert broken.reads == 1 and fine.reads == 1
    failures = [e["log_failure"] for e in events if "log_failure" in e]
    assert [f.type for f in failures] == [RuntimeError]


def test_a_second_stop_signal_while_stopping_is_no_error():
    import signal

    reactor = RelayReactor()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.callWhenRunning(reactor.sigTerm, signal.SIGTERM)
        reactor.callWhenRunning(reactor.sigTerm, signal.SIGTERM)
        reactor.run(installSignalHandlers=False)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor._poller.close()
    texts = [e.get("log_format", "") for e in events if e.get("signal") == "SIGTERM"]
    assert texts == [
        "Received {signal}, shutting down.",
        "Received {signal} while already stopping",
    ]
    assert not [e for e in events if "log_failure" in e]
