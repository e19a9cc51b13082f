"""The real client address of an HTTP request behind reverse proxies."""

from __future__ import annotations

import ipaddress
from typing import Sequence

from cpvm.common.addresses import address_in
from cpvm.manager.config import IPNetwork


def client_address(peer: str, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]) -> str:
    """The rightmost untrusted hop.

    ``X-Forwarded-For`` only counts when the TCP peer is a trusted proxy; then its entries
    are walked right to left and the first address that is not itself a trusted proxy is
    the client (anything left of it could have been written by the client).
    """
    if not trusted or not address_in(peer, trusted):
        return peer
    hops: list[str] = []
    for header in forwarded_for:
        hops.extend(h.strip() for h in header.split(",") if h.strip())
    current = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # Garbage in the header: stop at the last address we could trust.
            return current
        current = hop
        if not address_in(hop, trusted):
            return hop
    return current
