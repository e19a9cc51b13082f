"""What the manager takes from a libvirt domain: pure functions over its XML and state
code, so they are tested without libvirt.

Only ``<graphics type='vnc'>`` matters: its ``port`` (``-1`` while an autoport domain is
off), its listen address (the ``listen`` attribute or ``<listen type='address'>``) and its
``passwd`` (present only in the XML read with ``VIR_DOMAIN_XML_SECURE``).
"""

from __future__ import annotations

import ipaddress
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urlsplit

# virDomainState: RUNNING, BLOCKED, PAUSED have a live QEMU and so a VNC server.
_LIVE_STATES = frozenset({1, 2, 3})


@dataclass(frozen=True)
class Vnc:
    """A domain's VNC server as its XML describes it."""

    port: int | None  # None: not allocated (autoport, domain off)
    listen: str | None  # None: QEMU's default (all addresses)
    password: str | None


@dataclass(frozen=True)
class Domain:
    """One domain of a libvirt host, as a sync saw it."""

    uuid: str
    name: str
    running: bool
    vnc: Vnc | None  # None: no VNC console (no graphics, SPICE only, a UNIX socket)


def parse_vnc(xml: str) -> Vnc | None:
    """The first VNC graphics device of a domain's XML, or None without a TCP one."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for graphics in root.iter("graphics"):
        if graphics.get("type") != "vnc":
            continue
        if graphics.get("socket"):
            return None  # a UNIX socket on the host: nothing cpvm can connect to
        listen = graphics.get("listen")
        for item in graphics.findall("listen"):
            kind = item.get("type")
            if kind == "socket" or kind == "none":
                return None
            if kind == "address" and item.get("address"):
                listen = item.get("address")
                break
        port = _port(graphics.get("port"))
        return Vnc(port, listen or None, graphics.get("passwd") or None)
    return None


def _port(raw: str | None) -> int | None:
    try:
        port = int(raw or "")
    except ValueError:
        return None
    return port if 1 <= port <= 65535 else None


def domain_from(uuid: str, name: str, state_code: int, xml: str) -> Domain:
    """A :class:`Domain` from what libvirt answers (``virDomain.state()[0]``, the XML)."""
    return Domain(uuid, name, state_code in _LIVE_STATES, parse_vnc(xml))


def is_unspecified(listen: str | None) -> bool:
    """True for QEMU's "every address" listeners (absent, 0.0.0.0, ::)."""
    if not listen:
        return True
    try:
        return ipaddress.ip_address(listen.strip("[]")).is_unspecified
    except ValueError:
        return False


def vnc_host(listen: str | None, vnc_address: str | None, uri: str) -> str:
    """Where cpvm connects: the domain's own listen address, or for a domain listening on
    every address the source's ``vnc_address``, else the libvirt host of the URI (loopback
    for a local URI)."""
    if not is_unspecified(listen):
        assert listen is not None
        return listen.strip("[]")
    if vnc_address:
        return vnc_address
    return urlsplit(uri).hostname or "127.0.0.1"
