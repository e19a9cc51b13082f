"""The probe's legs, their exit statuses, and what one run found."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Leg(Enum):
    """One stretch of the console path, in the order a browser meets them:
    ``(name, exit status when it fails, what it covers)``."""

    API = ("api", 3, "createConsoleEndpoint on the manager")
    UPGRADE = ("upgrade", 4, "connecting to cpvm and the WebSocket upgrade")
    CONSOLE = ("console", 5, "token redemption and the VNC server's handshake, to ServerInit")
    FIRST_UPDATE = ("first_update", 6, "the first FramebufferUpdate after a full request")

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def exit_status(self) -> int:
        return self.value[1]

    @property
    def covers(self) -> str:
        return self.value[2]


#: Every leg passed: the console works end to end.
EXIT_HEALTHY = 0
#: The probe itself broke (a bug): nothing is known about the console path.
EXIT_INTERNAL = 1
#: Bad options or an unreadable credentials file (argparse uses 2 as well).
EXIT_USAGE = 2


class LegFailed(Exception):
    """``leg`` failed; ``reason`` says why in words an operator can act on (never a secret)."""

    def __init__(self, leg: Leg, reason: str):
        super().__init__(f"{leg.label}: {reason}")
        self.leg = leg
        self.reason = reason


@dataclass
class ProbeResult:
    """What one run measured: the seconds of each leg that finished, and the failure."""

    vm: str
    seconds: dict[Leg, float] = field(default_factory=dict)
    failed: Leg | None = None
    reason: str = ""
    #: The console proxy the manager chose (``host:port``), once known.
    proxy: str | None = None
    #: The desktop name from ServerInit, once known.
    desktop: str | None = None
    #: Pixels in the first screen update, once read.
    pixels: int | None = None

    @property
    def healthy(self) -> bool:
        return self.failed is None

    @property
    def exit_status(self) -> int:
        return EXIT_HEALTHY if self.failed is None else self.failed.exit_status

    def fail(self, error: LegFailed) -> None:
        self.failed = error.leg
        self.reason = error.reason
