"""What a ``ConsoleSession`` needs of the things around it, as typing protocols, and the
limits it is given and the statistics it keeps (plain data both sides read).

A session owns no socket and knows no registry: it talks to a ``Browser`` (the WebSocket
protocol), an ``Upstream`` (``VncClientProtocol``) and its ``SessionHooks`` (the session
registry), and tests hand it fakes of each.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class SessionLimits:
    """Timeouts of one session, in seconds (0 = no limit)."""

    handshake_timeout: float
    idle_timeout: float
    max_duration: float
    shared: bool = True


@dataclass
class SessionStats:
    """What the audit record and the end report carry."""

    started: float
    bytes_to_client: int = 0
    bytes_to_server: int = 0
    # How much of the above the byte counters already hold (see SessionRegistry).
    counted_to_client: int = 0
    counted_to_server: int = 0
    relay_started: float | None = None
    ended: float | None = None
