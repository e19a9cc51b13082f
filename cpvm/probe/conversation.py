"""Sans-IO: noVNC's side of a console, as the probe plays it, from the WebSocket's first
byte to the first screen update.

cpvm always offers the browser security type None (the token was its authorisation), so
the probe uses :class:`cpvm.rfb.client.RfbClientHandshake` without a password and with
None allowed; a refusal arrives as RFB's failure reason, which the handshake reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.probe.legs import Leg, LegFailed
from cpvm.probe.screen import FirstUpdateReader, ScreenError, UpdateRead, requests
from cpvm.rfb.client import RfbClientHandshake
from cpvm.rfb.events import Failed, SecurityComplete, Send, ServerInit, ServerInitReceived


@dataclass(frozen=True)
class Reply:
    """What to do after some bytes from cpvm: ``send`` them back; ``server_init`` or
    ``update`` when that milestone was reached with these bytes."""

    send: bytes = b""
    server_init: ServerInit | None = None
    update: UpdateRead | None = None


class ConsoleConversation:
    """Feed every binary message from cpvm to :meth:`receive`; send what it answers.

    Raises :class:`LegFailed` (leg ``console`` or ``first_update``) when cpvm refuses the
    console or a server sends what the probe cannot read.
    """

    def __init__(self) -> None:
        self._handshake = RfbClientHandshake(None, allow_none=True)
        self._screen: FirstUpdateReader | None = None
        self.leg = Leg.CONSOLE

    def receive(self, data: bytes) -> Reply:
        """Consume ``data``; the bytes to send and the milestones reached."""
        if self._screen is not None:
            return Reply(update=self._read_screen(data))
        out = bytearray()
        for event in self._handshake.receive(data):
            if isinstance(event, Send):
                out += event.data
            elif isinstance(event, SecurityComplete):
                for sent in self._handshake.send_client_init(shared=True):
                    if isinstance(sent, Send):
                        out += sent.data
                    else:
                        return self._handshake_event(sent, out)
            else:
                return self._handshake_event(event, out)
        return Reply(send=bytes(out))

    def _handshake_event(self, event, out: bytearray) -> Reply:
        if isinstance(event, Failed):
            raise LegFailed(Leg.CONSOLE, _refusal(event))
        if not isinstance(event, ServerInitReceived):
            raise LegFailed(Leg.CONSOLE, f"unexpected RFB step from cpvm: {type(event).__name__}")
        init = event.server_init
        try:
            self._screen = FirstUpdateReader(init)
        except ScreenError as e:
            raise LegFailed(Leg.CONSOLE, str(e)) from None
        self.leg = Leg.FIRST_UPDATE
        out += requests(init)
        update = self._read_screen(event.leftover) if event.leftover else None
        return Reply(send=bytes(out), server_init=init, update=update)

    def _read_screen(self, data: bytes) -> UpdateRead | None:
        assert self._screen is not None
        try:
            return self._screen.receive(data)
        except ScreenError as e:
            raise LegFailed(Leg.FIRST_UPDATE, str(e)) from None


_REFUSED = "server refused the connection: "


def _refusal(failed: Failed) -> str:
    if failed.kind == "auth" and failed.message.startswith(_REFUSED):
        # cpvm refuses with RFB's failure reason, the text a person sees in noVNC.
        return f"cpvm refused the console: {failed.message.removeprefix(_REFUSED)}"
    return f"RFB handshake with cpvm failed: {failed.message}"
