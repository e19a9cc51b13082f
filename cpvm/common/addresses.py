"""IP addresses against configured networks (trusted proxies, who may read metrics)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# ``allow = any`` in a configuration file.
EVERYWHERE: tuple[Network, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
# Who may read /metrics unless told otherwise.
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.1/32"),
    ipaddress.ip_network("::1/128"),
)


def address_in(address: str, networks: Iterable[Network]) -> bool:
    """Whether ``address`` (a textual IP; anything else is in no network) is in one of
    ``networks``; an IPv4-mapped IPv6 address (a dual-stack listener's peer) counts as
    its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return any(ip in net for net in networks)


def parse_networks(items: Iterable[str], *, allow_any: bool = True) -> tuple[Network, ...]:
    """Addresses or CIDR networks; ``any`` means every address, where ``allow_any`` (not
    for trusted proxies: trusting everyone's X-Forwarded-For must be spelled out).
    ``ValueError`` names the first item that is not accepted."""
    result: list[Network] = []
    for item in items:
        if allow_any and item.lower() == "any":
            result.extend(EVERYWHERE)
            continue
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            what = (
                "an address, CIDR network or 'any'" if allow_any else ("an address or CIDR network")
            )
            raise ValueError(f"{item!r} is not {what}") from None
    return tuple(result)


def client_address(
    peer: str, forwarded_for: str | Sequence[str] | None, trusted: Iterable[Network]
) -> str:
    """The real client's address, the same way in both daemons.

    ``X-Forwarded-For`` only counts when the TCP peer ``peer`` is a trusted proxy; then its
    entries (one header value or several) are walked right to left and the first address
    that is not itself a trusted proxy is the client: anything left of it could have been
    written by the client. Garbage in the header stops the walk at the last address that
    could be trusted; when every hop is trusted, the leftmost one is the client.
    """
    trusted = tuple(trusted)
    if not forwarded_for or not trusted or not address_in(peer, trusted):
        return peer
    values = [forwarded_for] if isinstance(forwarded_for, str) else list(forwarded_for)
    hops = [h.strip() for value in values for h in value.split(",") if h.strip()]
    current = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return current
        current = hop
        if not address_in(hop, trusted):
            return hop
    return current
