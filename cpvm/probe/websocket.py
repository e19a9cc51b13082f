"""The probe's WebSocket to cpvm: an Autobahn client protocol as a thin shell around
:class:`~cpvm.probe.conversation.ConsoleConversation`, timing each leg on the reactor's
clock."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger

from cpvm.probe.api import ConsoleEndpoint
from cpvm.probe.conversation import ConsoleConversation
from cpvm.probe.legs import Leg, LegFailed, ProbeResult

#: noVNC's largest message is 10 KiB; a screen update can be megabytes in one message.
MAX_MESSAGE = 64 * 1024 * 1024


class ProbeWebSocket(WebSocketClientProtocol):
    """One console, opened as noVNC would, closed after the first screen update.

    ``done`` fires with None when the update was read (then the socket is closed with
    1000), or fails with :class:`LegFailed` for the leg in progress. Autobahn owns
    ``self.log``; ours is ``_log``.
    """

    _log = Logger()

    def __init__(self, clock: Any, result: ProbeResult, timeout: float):
        super().__init__()
        self._clock = clock
        self._result = result
        self._timeout = timeout
        self._conversation = ConsoleConversation()
        self._leg = Leg.UPGRADE
        self._started = clock.seconds()
        self._refusal: LegFailed | None = None
        self._timer = clock.callLater(timeout, self._timed_out)
        self.done: defer.Deferred[None] = defer.Deferred()
        #: Fires when the connection is closed, however it ended.
        self.closed: defer.Deferred[None] = defer.Deferred()

    def _finish_leg(self, next_leg: Leg | None) -> None:
        now = self._clock.seconds()
        self._result.seconds[self._leg] = now - self._started
        self._started = now
        if next_leg is not None:
            self._leg = next_leg
            self._timer.reset(self._timeout)

    def onOpen(self) -> None:  # noqa: N802 (Autobahn's name)
        self._finish_leg(Leg.CONSOLE)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        if self.done.called or self._refusal is not None:
            return
        if not isBinary:
            self._fail(LegFailed(self._leg, "cpvm sent a text frame"))
            return
        try:
            reply = self._conversation.receive(payload)
        except LegFailed as refused:
            # Wait for cpvm's close: its code says the same thing in numbers.
            self._refusal = refused
            return
        if reply.send:
            self.sendMessage(reply.send, isBinary=True)
        if reply.server_init is not None:
            self._result.desktop = reply.server_init.name.decode("utf-8", "replace")
            self._finish_leg(Leg.FIRST_UPDATE)
        if reply.update is not None:
            self._result.pixels = reply.update.pixels
            self._finish_leg(None)
            self._timer.cancel()
            self.sendClose(1000)
            self.done.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        if not self.closed.called:
            self.closed.callback(None)
        if self.done.called:
            return
        said = f"close code {code}" + (f" ({reason})" if reason else "")
        if self._refusal is not None:
            told = self._refusal.reason
            if reason and repr(reason) in told:
                told += f" (close code {code})"  # the same words twice say nothing more
            else:
                told += f"; {said}"
            self._fail(LegFailed(self._refusal.leg, told))
        elif self._leg is Leg.UPGRADE:
            self._fail(LegFailed(Leg.UPGRADE, f"the WebSocket upgrade failed: {reason or said}"))
        else:
            self._fail(LegFailed(self._leg, f"cpvm closed the console: {said}"))

    def _timed_out(self) -> None:
        what = "the WebSocket upgrade" if self._leg is Leg.UPGRADE else self._leg.covers
        self._fail(LegFailed(self._leg, f"no progress within {self._timeout:g} s ({what})"))
        self.dropConnection(abort=True)

    def _fail(self, error: LegFailed) -> None:
        if self._timer.active():
            self._timer.cancel()
        if not self.done.called:
            self.done.errback(error)


async def probe_console(
    reactor: Any,
    endpoint: ConsoleEndpoint,
    result: ProbeResult,
    *,
    timeout: float,
    trust_root: Any = None,
) -> None:
    """Open ``endpoint``'s WebSocket and read up to the first screen update into
    ``result``; raise :class:`LegFailed` for the leg that failed."""
    factory = WebSocketClientFactory(endpoint.websocket_url, protocols=["binary"])
    factory.setProtocolOptions(
        openHandshakeTimeout=timeout,
        closeHandshakeTimeout=2,
        maxFramePayloadSize=MAX_MESSAGE,
        maxMessagePayloadSize=MAX_MESSAGE,
        perMessageCompressionOffers=[],
    )
    protocol = ProbeWebSocket(reactor, result, timeout)
    protocol.factory = factory
    tcp: IStreamClientEndpoint = HostnameEndpoint(
        reactor, endpoint.host, endpoint.port, timeout=timeout
    )
    if endpoint.secure:
        tcp = wrapClientTLS(optionsForClientTLS(endpoint.host, trustRoot=trust_root), tcp)
    try:
        await connectProtocol(tcp, protocol)
    except Exception as e:
        protocol._timer.cancel()
        raise LegFailed(Leg.UPGRADE, f"cannot connect to cpvm at {endpoint.where}: {e}") from None
    await protocol.done
    # A clean close, so cpvm records the browser side as closed (bounded: the result is in).
    try:
        await protocol.closed.addTimeout(2, reactor)
    except defer.TimeoutError:
        protocol.dropConnection(abort=True)
