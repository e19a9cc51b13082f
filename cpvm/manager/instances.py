"""One proxy key, one running cpvm: which instance a key is bound to, and who is refused.

Each cpvm sends its instance id (``cpvm/proxy/instance.py``) with every heartbeat and redemption.
A key is bound to the instance that last used it; while that instance is live (its last
heartbeat within ``[proxies] proxy_timeout``) another instance's calls are refused with
409 ``instance_conflict``, so two proxies holding one key cannot take turns at being "the"
proxy (console URLs flipping between them, each reconciling the other's sessions away).
Once the bound instance has been silent for ``proxy_timeout`` another may take over; a
restart of the bound instance (same id) is accepted at once.

A caller that sends no instance id (a cpvm older than this rule) is refused while an
identified instance holds the key, and otherwise served without binding it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cpvm.common.contract import REDEMPTION_ERROR_MESSAGE

# What the proxy API accepts as an instance id (cpvm sends 32 hex digits).
INSTANCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

CONFLICT_MESSAGE = REDEMPTION_ERROR_MESSAGE["instance_conflict"]

# A refused instance is logged again after this long even if it is the same one.
RELOG_AFTER = 60.0


@dataclass(frozen=True)
class InstanceBinding:
    """What the database holds about a proxy key's instances."""

    proxy_id: str
    instance_id: str | None
    seen_at: float | None  # last heartbeat (or taking-over redemption) of that instance
    address: str | None  # where it called from
    refused_id: str | None
    refused_at: float | None
    refused_address: str | None

    def live(self, now: float, timeout: float) -> bool:
        return (
            self.instance_id is not None
            and self.seen_at is not None
            and now - self.seen_at <= timeout
        )


@dataclass(frozen=True)
class InstanceDecision:
    """Whether a call from ``caller`` is served, and what it does to the binding."""

    accepted: bool
    bind: bool  # record the caller as the key's instance, seen now
    takeover: bool  # bind replaces another (silent) instance


def decide(
    bound: str | None, seen_at: float | None, caller: str | None, now: float, timeout: float
) -> InstanceDecision:
    """The binding rule (module docstring) with explicit times; never reads or writes."""
    if caller is not None and caller == bound:
        return InstanceDecision(True, True, False)
    live = bound is not None and seen_at is not None and now - seen_at <= timeout
    if live:
        return InstanceDecision(False, False, False)
    if caller is None:
        return InstanceDecision(True, False, False)
    return InstanceDecision(True, True, bound is not None)


@dataclass(frozen=True)
class InstanceEvent:
    """A call refused for ``instance_conflict`` (``refused``), or a heartbeat that took
    the key over from a silent instance: what the log line needs."""

    binding: InstanceBinding  # as it was before this call
    caller: str | None
    address: str | None
    now: float
    refused: bool = True

    @property
    def worth_logging(self) -> bool:
        """Not every beat of the same refused instance: once a minute is enough."""
        b = self.binding
        return (
            b.refused_id != self.caller
            or b.refused_at is None
            or self.now - b.refused_at >= RELOG_AFTER
        )
