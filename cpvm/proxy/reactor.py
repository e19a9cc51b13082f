"""cpvm's reactor: Twisted's epoll reactor without a log context per I/O event.

For every readable or writable socket, ``EPollReactor.doPoll`` runs the handler through
``twisted.python.log.callWithLogger``, which asks the connection for its log prefix and
pushes a copy of the legacy log context, so that old-style ``log.msg`` calls made inside
carry a "system" field. cpvm and the libraries on its path log with ``twisted.logger``,
which does not read that context; on the relay's path (an event per keystroke, per screen
update) it was about a quarter of a round trip's CPU. Here the handler is called directly,
keeping what ``callWithLogger`` guarantees: an exception is logged and the loop goes on.

Chosen with ``twistd --reactor=cpvm`` (the systemd units do); without it the daemons run
on Twisted's default reactor, the same way, a little slower.
"""

from __future__ import annotations

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor
from twisted.logger import Logger


class RelayReactor(EPollReactor):
    _log = Logger()

    def doPoll(self, timeout):  # noqa: N802 (Twisted's name)
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except InterruptedError:
            return
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                self._log.failure(
                    "unhandled error in an I/O handler ({selectable!r})", selectable=selectable
                )

    doIteration = doPoll

    # A second stop signal while the first is draining sessions (systemd and an operator,
    # a supervisor and a parent-death signal) is not an error: say so, do not stop twice
    # (Twisted's own handlers log a critical ReactorNotRunning traceback).
    def sigInt(self, number, frame=None):  # noqa: N802
        self._stop_on_signal("SIGINT", number)

    def sigTerm(self, number, frame=None):  # noqa: N802
        self._stop_on_signal("SIGTERM", number)

    def _stop_on_signal(self, name: str, number: int) -> None:
        self._exitSignal = number
        self.callFromThread(self._stop_once, name)

    def _stop_once(self, name: str) -> None:
        if self._stopped:
            self._log.info("Received {signal} while already stopping", signal=name)
            return
        self._log.info("Received {signal}, shutting down.", signal=name)
        self.stop()


def install() -> None:
    installReactor(RelayReactor())
