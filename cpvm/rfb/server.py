"""The RFB server handshake: the browser to cpvm (security type None)."""

from __future__ import annotations

from cpvm.rfb.events import (
    _U32,
    MAX_REASON_LENGTH,
    SEC_INVALID,
    SEC_NONE,
    ClientInitReceived,
    ClientVersionReceived,
    Event,
    Send,
    ServerInit,
)
from cpvm.rfb.machine import _Machine


class RfbServerHandshake(_Machine):
    """cpvm's side of the RFB handshake towards the browser, as a server.

    Always announces RFB 3.8 and offers security type None only: the browser was already
    authorised by its one-time token, and the VNC password never leaves cpvm. Call
    :meth:`start`, feed received bytes to :meth:`receive`, and after
    :class:`ClientInitReceived` answer with :meth:`send_server_init`.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Minor version agreed with the client (3, 7 or 8) once known.
        self.minor_version: int | None = None

    def __repr__(self) -> str:
        return f"<RfbServerHandshake phase={self.phase!r} failed={self._dead}>"

    def start(self) -> list[Event]:
        """Begin the handshake: return the server's version message."""
        if self._step != self._step_not_started:
            raise RuntimeError("start() called twice")
        self._step = self._step_version
        return [Send(b"RFB 003.008\n")]

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes received from the browser; return the resulting events."""
        if self._dead:
            return []
        if self._step == self._step_not_started:
            raise RuntimeError("receive() called before start()")
        if self._step in (self._step_wait_for_server_init, self._step_done):
            raise RuntimeError("handshake input is over: buffer or relay the bytes instead")
        self._buf += data
        return self._run([])

    def send_server_init(self, server_init: ServerInit, name: bytes | None = None) -> list[Event]:
        """Send ServerInit to the browser, with the desktop name replaced by ``name`` if given."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_server_init:
            raise RuntimeError("send_server_init() called before ClientInitReceived")
        if name is not None:
            server_init = server_init.with_name(name)
        self._step = self._step_done
        return [Send(server_init.to_bytes())]

    def _step_version(self, events: list[Event]) -> bool:
        version = self._take_version(events, "client")
        if version is None:
            return False
        raw, major, minor = version
        if major != 3:
            return self._fail(events, "protocol", f"unsupported RFB version {raw!r}")
        # Versions between the official ones behave like the one below (RFC 6143), and a
        # client claiming more than our 3.8 gets 3.8.
        minor = 3 if minor < 7 else min(minor, 8)
        self.minor_version = minor
        events.append(ClientVersionReceived(minor))
        self._step = self._step_wait_for_decision
        return True

    def _step_wait_for_decision(self, events: list[Event]) -> bool:
        # Input waits in the buffer until accept() or reject().
        return False

    def accept(self) -> list[Event]:
        """Offer security type None and continue towards ClientInit."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_decision:
            raise RuntimeError("accept() called before ClientVersionReceived")
        events: list[Event] = []
        if self.minor_version == 3:
            # RFB 3.3: the server imposes the type.
            events.append(Send(_U32.pack(SEC_NONE)))
            self._step = self._step_client_init
        else:
            events.append(Send(bytes([1, SEC_NONE])))
            self._step = self._step_security_choice
        return self._run(events)

    def reject(self, reason: str) -> list[Event]:
        """Refuse the connection with ``reason`` (shown to the person by noVNC)."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_decision:
            raise RuntimeError("reject() called before ClientVersionReceived")
        raw = reason.encode("utf-8")[:MAX_REASON_LENGTH]
        # 3.3 signals failure with security type 0; 3.7+ with an empty type list. Both are
        # followed by the reason string.
        head = _U32.pack(SEC_INVALID) if self.minor_version == 3 else b"\x00"
        self._dead = True
        return [Send(head + _U32.pack(len(raw)) + raw)]

    def _step_security_choice(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        choice = self._take(1)[0]
        if choice != SEC_NONE:
            message = f"client chose security type {choice} but only {SEC_NONE} (None) is offered"
            if self.minor_version == 8:
                reason = b"security type not offered"
                events.append(Send(_U32.pack(1) + _U32.pack(len(reason)) + reason))
            return self._fail(events, "protocol", message)
        if self.minor_version == 8:
            # 3.8 sends a SecurityResult even for None; 3.7 does not.
            events.append(Send(_U32.pack(0)))
        self._step = self._step_client_init
        return True

    def _step_client_init(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        shared = self._buf[0] != 0
        leftover = bytes(self._buf[1:])
        self._buf = bytearray()
        events.append(ClientInitReceived(shared, leftover))
        self._step = self._step_wait_for_server_init
        return False

    def _step_wait_for_server_init(self, events: list[Event]) -> bool:
        return False

    def _step_done(self, events: list[Event]) -> bool:
        return False
