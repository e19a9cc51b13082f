"""The browser's WebSocket: an Autobahn protocol as a thin shell around ``ConsoleSession``.

Everything that can be refused without the manager is refused in ``onConnect``, before
any token is redeemed: wrong path, disallowed origin, missing or repeated token, a proxy
at capacity. A missing token and a full proxy are told to the person after the upgrade
(:mod:`cpvm.proxy.refusal`); the rest are an HTTP status, and a refused Origin is logged
with the setting that would allow it.
"""

from __future__ import annotations

import struct
import types
from typing import TYPE_CHECKING, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger

from cpvm.common.addresses import client_address
from cpvm.common.contract import (
    MAX_EXTRA_LENGTH,
    MAX_TOKEN_LENGTH,
    WEBSOCKET_PATH,
    Outcome,
)
from cpvm.common.ratelimit import LogThrottle
from cpvm.proxy import fastwrite
from cpvm.proxy.refusal import (
    MAX_TOLD_AT_ONCE,
    TELL_GRACE,
    ToldRefusal,
    origin_refusal_detail,
)
from cpvm.proxy.wsframes import FrameReader

if TYPE_CHECKING:  # pragma: no cover
    from cpvm.proxy.registry import SessionRegistry

_HEADER16 = struct.Struct("!BBH")
_HEADER64 = struct.Struct("!BBQ")
_SMALL_HEADERS = [bytes((0x82, n)) for n in range(126)]


class Refused(ConnectionDeny):
    """A refusal in ``onConnect``: ``reason`` is the metric label and the HTTP status text;
    ``detail`` is for the log; ``tell`` is the outcome to tell the person after the upgrade
    instead of answering the HTTP status (None: the status it is)."""

    def __init__(self, code: int, reason: str, detail: str = "", tell: Outcome | None = None):
        super().__init__(code, reason)
        self.detail = detail or reason
        self.tell = tell


class ConsoleWebSocketProtocol(WebSocketServerProtocol):
    """One browser connection. Autobahn owns ``self.log``; ours is ``_log``."""

    _log = Logger()
    factory: "ConsoleWebSocketFactory"
    maxFramePayloadSize: int  # an option Autobahn sets (here: the factory's class)

    def __init__(self) -> None:
        super().__init__()
        self._session = None
        # Incoming frames are parsed by a FrameReader while the connection is open and
        # unfragmented; everything else (control frames, fragments, oversize, closing)
        # goes to Autobahn. None: Autobahn has bytes or a frame of its own in hand.
        self._frames: FrameReader | None = None
        # A refusal told to the person after the upgrade (no session then).
        self._told: ToldRefusal | None = None
        self._told_timer = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        frames = self._frames
        if frames is None:
            if not self._autobahn_idle():
                super().dataReceived(data)
                return
            frames = self._frames = FrameReader(self.maxFramePayloadSize)
        for payload in frames.feed(data):
            self._binary(payload)
            if self.state != self.STATE_OPEN:
                self._frames = None
                return
        if frames.handoff is not None:
            self._frames = None
            super().dataReceived(frames.handoff)

    def _autobahn_idle(self) -> bool:
        """Open, and Autobahn holds no partial frame, message or unparsed bytes."""
        return (
            self.state == self.STATE_OPEN
            and not self.data
            and self.current_frame is None
            and not self.inside_message
        )

    def onConnect(self, request):  # noqa: N802 (Autobahn's name)
        f = self.factory
        peer = self.transport.getPeer()
        client = client_address(
            getattr(peer, "host", "unknown"),
            request.headers.get("x-forwarded-for"),
            f.trusted_proxies,
        )
        try:
            token, extra = self._check_request(request, client)
        except Refused as deny:
            count = f.refusal_log.event(deny.reason)  # a flood: one line per interval
            if count is not None:
                self._log.info(
                    "refused WebSocket from {client}: {detail} ({count} since the last line)",
                    client=client,
                    reason=deny.reason,
                    detail=deny.detail,
                    count=count,
                )
            f.sessions.refused(deny.reason)
            if deny.tell is None or f.told_refusals >= MAX_TOLD_AT_ONCE:
                raise
            f.told_refusals += 1
            self._told = ToldRefusal(deny.tell)
        else:
            self._session = f.sessions.create(self, token, extra, client)
        if "binary" in request.protocols:
            return "binary"
        return None

    def _check_request(self, request, client: str) -> tuple[str, str | None]:
        f = self.factory
        if request.path != "/" + WEBSOCKET_PATH:
            raise Refused(404, "unknown WebSocket path")
        origin = request.headers.get("origin")
        host = request.headers.get("host")
        if not origin_allowed(origin, host, f.scheme, f.allowed_origins):
            detail = origin_refusal_detail(origin or "", host, f.scheme, f.allowed_origins)
            raise Refused(403, "origin not allowed", detail)
        tokens = request.params.get("token", [])
        extras = request.params.get("extra", [])
        if len(tokens) != 1 or not tokens[0] or len(tokens[0]) > MAX_TOKEN_LENGTH:
            # Often a console URL whose noVNC path lost its encoding: tell the person.
            raise Refused(
                400, "exactly one token query parameter is required", tell=Outcome.BAD_REQUEST
            )
        if len(extras) > 1 or (extras and len(extras[0]) > MAX_EXTRA_LENGTH):
            raise Refused(400, "at most one extra query parameter is allowed")
        if f.sessions.at_capacity():
            if not f.sessions.accepting:
                raise Refused(503, "console proxy at capacity", "shutting down")
            raise Refused(
                503,
                "console proxy at capacity",
                "console proxy at capacity ([session] max_sessions)",
                tell=Outcome.AT_CAPACITY,
            )
        if f.sessions.too_many_pending():
            # The defence against floods of upgrades: nothing held open, not even to tell.
            raise Refused(
                503,
                "too many consoles being opened",
                "too many consoles being opened ([session] max_pending)",
            )
        return tokens[0], (extras[0] if extras else None)

    def onOpen(self):  # noqa: N802
        # Autobahn keeps the upgrade request for the connection's life; the token in it is
        # spent, but a memory dump should not hold it either.
        self.http_request_data = self.http_request_uri = self.http_request_path = None
        self.http_request_params = {}
        if self._told is not None:
            self.send(self._told.start())
            self._told_timer = self.factory.reactor.callLater(TELL_GRACE, self._tell_done)
            return
        try:
            self._session.start()
        except Exception:
            # Autobahn swallows exceptions here; log and close ourselves.
            self._log.failure("starting a console session failed")
            self.close(Outcome.ERROR.code, Outcome.ERROR.text)

    def _binary(self, payload: bytes) -> None:
        if self._session is not None:
            self._session.browser_data(payload)
        elif self._told is not None:
            reply, finished = self._told.receive(payload)
            if reply:
                self.send(reply)
            if finished:
                self._tell_done()

    def _tell_done(self) -> None:
        assert self._told is not None
        if self._told_timer is not None and self._told_timer.active():
            self._told_timer.cancel()
        self._told_timer = None
        self.close(self._told.outcome.code, self._told.outcome.text)

    def onMessage(self, payload, isBinary):  # noqa: N802
        if not isBinary:
            if self._session is not None:
                self._session.browser_text_frame()
            return
        self._binary(payload)

    def onClose(self, wasClean, code, reason):  # noqa: N802
        if self._session is not None:
            self._session.browser_closed(code)
        elif self._told is not None:
            if self._told_timer is not None and self._told_timer.active():
                self._told_timer.cancel()
            self.factory.told_refusals -= 1
            self._told = None

    # -- what the session calls ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        """One binary frame per chunk, written without copying the payload.

        Autobahn's sendMessage joins header and payload (a copy of every screen update)
        and formats debug arguments even when debug logging is off; on the relay's hot
        path the frame is built here: unmasked (server to client), FIN, opcode binary.
        """
        if self.state != self.STATE_OPEN:
            return
        n = len(data)
        if n < 126:
            header = _SMALL_HEADERS[n]
        elif n < 65536:
            header = _HEADER16.pack(0x82, 126, n)
        else:
            header = _HEADER64.pack(0x82, 127, n)
        fastwrite.write_frame(self.transport, header, data)

    def close(self, code: int, reason: str) -> None:
        if self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)
        else:
            # sendClose() only allows 1000 and 3000-4999; 1001 (going away), 1003 and 1011
            # are the right codes for shutdown, text frames and internal errors.
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)


class ConsoleWebSocketFactory(WebSocketServerFactory):
    """Holds what every browser connection needs: policy and the session registry."""

    # Autobahn's factory subclasses ServerFactory unparametrized, pinning protocol to
    # Twisted's _ProtoWithFactory, whose invariant factory type no typed subclass matches.
    protocol = ConsoleWebSocketProtocol  # type: ignore[assignment]

    def __init__(
        self,
        *,
        sessions: "SessionRegistry",
        scheme: str,
        allowed_origins: tuple[str, ...],
        trusted_proxies: tuple,
        open_handshake_timeout: float,
        max_message_size: int,
        server_name: str,
        reactor=None,
    ):
        super().__init__(server=server_name, reactor=reactor)
        self.sessions = sessions
        self.refusal_log = LogThrottle(self.reactor)
        #: Refusals being told after the upgrade (``cpvm.proxy.refusal``), bounded.
        self.told_refusals = 0
        self.scheme = scheme
        self.allowed_origins = allowed_origins
        self.trusted_proxies = trusted_proxies
        self.setProtocolOptions(
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=5,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            # A dead browser (laptop lid closed) is noticed within a minute.
            autoPingInterval=30,
            autoPingTimeout=30,
            # noVNC needs no compression; RFB encodings already compress.
            perMessageCompressionAccept=lambda offers: None,
            # Echoing the Host header back in errors is needless; keep pages bare.
            webStatus=False,
        )
        # Autobahn copies ~30 options from the factory onto every new protocol and
        # pretty-prints them for a debug line even when debug is off, on every connection
        # (docs/performance.md, set-up). A class of this factory's own holds them once, for every session,
        # and an empty CONFIG_ATTRS leaves Autobahn nothing to copy or print.
        # Callables (perMessageCompressionAccept) stay plain functions, not methods.
        options = {
            name: _class_attribute(getattr(self, name)) for name in self.protocol.CONFIG_ATTRS
        }
        self.protocol = cast(
            type[ConsoleWebSocketProtocol],
            type(self.protocol.__name__, (self.protocol,), {**options, "CONFIG_ATTRS": ()}),
        )


def _class_attribute(value):
    return staticmethod(value) if isinstance(value, types.FunctionType) else value


def origin_allowed(
    origin: str | None, host: str | None, scheme: str, allowed: tuple[str, ...]
) -> bool:
    """``self`` in ``allowed`` admits the page's own origin (``scheme://Host``)."""
    if "*" in allowed:
        return True
    if not origin:
        # Browsers always send Origin on WebSocket upgrades; non-browser clients (health
        # probes, tools) carry no ambient credentials, so they gain nothing from a bypass.
        return True
    origin = origin.rstrip("/").lower()
    if "self" in allowed and host and origin == f"{scheme}://{host.lower()}":
        return True
    return origin in allowed
