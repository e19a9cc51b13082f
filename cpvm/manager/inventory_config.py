"""``[inventory.libvirt.NAME]`` sections of manager.conf: libvirt hosts whose domains the
manager registers as VMs (see :mod:`cpvm.manager.inventory`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from cpvm.common.inifile import IniReader
from cpvm.manager.proxy_policy import public_host_problem

PREFIX = "inventory.libvirt."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_SCHEMES = (
    "qemu://",
    "qemu+ssh://",
    "qemu+tls://",
    "qemu+unix://",
    "qemu+tcp://",
    "qemu+libssh2://",
    "qemu+libssh://",
    "qemu:///",
)


@dataclass(frozen=True)
class LibvirtSourceConfig:
    """One libvirt host: how to reach it, whose its domains are, how to reach their VNC."""

    name: str
    uri: str
    owner: str  # account name or id
    vnc_address: str | None  # used when a domain's VNC listens on 0.0.0.0 / ::
    vnc_tls: str  # none | x509 (libvirt's vnc_tls with vnc_tls_x509_verify)
    vnc_ca_pem: str | None
    vnc_server_name: str | None
    sync_interval: float
    timeout: float  # a sync (connect, list, read) slower than this: the host is down

    @property
    def source(self) -> str:
        """The ``source`` its VMs carry in the registry."""
        return f"libvirt:{self.name}"


def _uri(reader: IniReader, section: str) -> str:
    uri = reader.optional_string(section, "uri")
    if uri is None:
        raise reader.error(section, "uri", "required (qemu:///system, qemu+ssh://…, qemu+tls://…)")
    if not uri.startswith(_SCHEMES):
        raise reader.error(section, "uri", f"expected a qemu libvirt URI, got {uri!r}")
    return uri


def _vnc_address(reader: IniReader, section: str) -> str | None:
    value = reader.optional_string(section, "vnc_address")
    if value is None:
        return None
    problem = public_host_problem(value)
    if problem is not None:
        raise reader.error(section, "vnc_address", problem.replace("public_host", "vnc_address"))
    try:
        if ipaddress.ip_address(value).is_unspecified:
            raise reader.error(
                section, "vnc_address", "must be an address to connect to, not 0.0.0.0 or ::"
            )
    except ValueError:
        pass
    return value


def _ca_pem(reader: IniReader, section: str, tls: str) -> str | None:
    path = reader.path(section, "vnc_ca_file", None, must_exist=True)
    if path is None:
        if tls == "x509":
            raise reader.error(section, "vnc_ca_file", "required with vnc_tls = x509")
        return None
    if tls != "x509":
        raise reader.error(section, "vnc_ca_file", "applies only with vnc_tls = x509")
    pem = path.read_text(encoding="utf-8", errors="replace")
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise reader.error(section, "vnc_ca_file", f"{str(path)!r} holds no PEM certificate")
    return pem


def read_source(reader: IniReader, section: str) -> LibvirtSourceConfig:
    """One ``[inventory.libvirt.NAME]`` section."""
    name = section[len(PREFIX) :]
    if not _NAME.match(name):
        raise reader.error(section, None, "NAME must be letters, digits, '-' or '_' (at most 63)")
    owner = reader.optional_string(section, "owner")
    if owner is None:
        raise reader.error(section, "owner", "required: the account that owns these VMs")
    tls = reader.choice(section, "vnc_tls", "none", ("none", "x509"))
    server_name = reader.optional_string(section, "vnc_server_name")
    if server_name is not None and public_host_problem(server_name) is not None:
        raise reader.error(section, "vnc_server_name", "expected a host name")
    return LibvirtSourceConfig(
        name=name,
        uri=_uri(reader, section),
        owner=owner,
        vnc_address=_vnc_address(reader, section),
        vnc_tls=tls,
        vnc_ca_pem=_ca_pem(reader, section, tls),
        vnc_server_name=server_name,
        sync_interval=reader.number(section, "sync_interval", 30.0, minimum=1.0, maximum=86400.0),
        timeout=reader.number(section, "timeout", 30.0, minimum=1.0, maximum=3600.0),
    )


def read_inventory(reader: IniReader) -> tuple[LibvirtSourceConfig, ...]:
    """Every ``[inventory.libvirt.NAME]`` section, in file order."""
    return tuple(read_source(reader, s) for s in reader.sections_with_prefix(PREFIX))
