"""What one proxy key may do: its capacity ceiling, the networks it may call from, and
what a heartbeat may claim as its public host.

A stolen proxy key must not capture every new console: the manager sends new consoles,
and with them VNC passwords, to the proxy that claims the most free capacity at whatever
``public_host`` it names. So the administrator gives each key a ceiling (a claimed capacity
above it is clamped) and, optionally, the networks its calls may come from (the TCP peer
decides, never ``X-Forwarded-For``); the public host must be a plain host name or address.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cpvm.common.addresses import Network, address_in, parse_networks


@dataclass(frozen=True)
class ProxyPolicy:
    """The administrator's limits on one proxy key (``None``: no limit of that kind)."""

    max_capacity: int | None = None
    allowed_networks: tuple[Network, ...] | None = None

    def admits(self, peer: str | None) -> bool:
        """Whether a call from TCP peer ``peer`` may use this key. A peer that is not an
        IP address (a Unix socket) is admitted only when no networks are set."""
        if self.allowed_networks is None:
            return True
        return peer is not None and address_in(peer, self.allowed_networks)

    def clamp(self, claimed: int) -> int:
        """The capacity the manager believes: the claim, at most the ceiling."""
        if self.max_capacity is None:
            return claimed
        return min(claimed, self.max_capacity)


NO_LIMITS = ProxyPolicy()


def format_networks(networks: Iterable[Network] | None) -> str | None:
    """The stored form of an allow list: canonical CIDRs, space-separated (None: any)."""
    if networks is None:
        return None
    return " ".join(str(n) for n in networks)


@functools.lru_cache(maxsize=256)
def _parse_stored(text: str) -> tuple[Network, ...]:
    return parse_networks(text.split(), allow_any=False)


def policy_from_row(max_capacity: int | None, allowed: str | None) -> ProxyPolicy:
    """The policy of a ``proxies`` row (its ``max_capacity``, ``allowed_networks``)."""
    networks = _parse_stored(allowed) if allowed is not None else None
    return ProxyPolicy(None if max_capacity is None else int(max_capacity), networks)


def parse_allow(items: Iterable[str]) -> tuple[Network, ...] | None:
    """``--allow`` values: addresses or CIDRs (commas or spaces between them); ``any``
    alone lifts the restriction (None). ``ValueError`` names what is not accepted."""
    parts = [p for item in items for p in item.replace(",", " ").split()]
    if not parts:
        raise ValueError("--allow needs at least one address or CIDR network")
    if any(p.lower() == "any" for p in parts):
        if len(parts) > 1:
            raise ValueError("--allow any cannot be combined with networks")
        return None
    return parse_networks(parts, allow_any=False)


# RFC 1123 labels: letters, digits, inner hyphens; at most 63 characters each.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def public_host_problem(host: str) -> str | None:
    """Why ``host`` is not a plain host name or IP address, or None when it is one.

    Nothing else may reach a console URL: no scheme, path, port, userinfo, brackets,
    spaces, zone id or percent-encoding; a name whose last label is numeric is refused
    because browsers read such a name as an IPv4 address (``1.2.3`` is 1.2.0.3).
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if "%" in host:
            return "public_host must not carry an IPv6 zone id"
        return None
    if len(host) > 253:
        return "public_host must be at most 253 characters"
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if not name or not all(_LABEL.match(label) for label in labels):
        return (
            "public_host must be a host name (letters, digits, hyphens, dots) or an "
            "IP address, without scheme, port or path"
        )
    if labels[-1].isdigit():
        return "public_host looks like an incomplete IPv4 address"
    return None
