"""What a ``ConsoleSession`` needs of the things around it, as typing protocols.

A session owns no socket and knows no registry: it talks to a ``Browser`` (the WebSocket
protocol), an ``Upstream`` (``VncClientProtocol``) and its ``SessionHooks`` (the session
registry), and tests hand it fakes of each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from typing import Protocol as TypingProtocol

from cpvm.common.contract import Outcome

if TYPE_CHECKING:  # pragma: no cover
    from cpvm.proxy.session import ConsoleSession


class Browser(TypingProtocol):
    """The browser side as the session sees it (the WebSocket protocol)."""

    transport: Any

    def send(self, data: bytes) -> None: ...
    def close(self, code: int, reason: str) -> None: ...


class Upstream(TypingProtocol):
    """The VNC side as the session sees it (``VncClientProtocol``)."""

    transport: Any

    def write(self, data: bytes) -> None: ...
    def send_client_init(self, shared: bool) -> None: ...
    def close(self) -> None: ...


class SessionHooks(TypingProtocol):
    """Where a session reports its life (registry, metrics, audit, manager)."""

    def redeemed(self, session: ConsoleSession) -> None: ...
    def redeemed_after_close(self, session: ConsoleSession) -> None: ...
    def relay_started(self, session: ConsoleSession) -> None: ...
    def ended(self, session: ConsoleSession, outcome: Outcome, detail: str) -> None: ...
