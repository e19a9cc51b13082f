"""Configuration sections both daemons read the same way: ``[log]`` and ``[metrics]``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpvm.common.addresses import LOOPBACK, Network, parse_networks
from cpvm.common.inifile import IniReader


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: output format, level and the audit file (both daemons)."""

    format: str
    level: str
    audit_file: Path | None


def read_log(r: IniReader) -> LogConfig:
    """The ``[log]`` section, the same in cpvm.conf and manager.conf."""
    return LogConfig(
        format=r.choice("log", "format", "text", ("text", "json")),
        level=r.choice("log", "level", "info", ("debug", "info", "warn", "error")),
        audit_file=r.path("log", "audit_file", None),
    )


@dataclass(frozen=True)
class MetricsConfig:
    """``/metrics``: served at all, and to which client addresses (both daemons)."""

    enabled: bool
    allow: tuple[Network, ...]


def read_metrics(r: IniReader) -> MetricsConfig:
    """The ``[metrics]`` section, the same in cpvm.conf and manager.conf."""
    return MetricsConfig(
        enabled=r.boolean("metrics", "enabled", True),
        allow=networks(r, "metrics", "allow", allow_any=True) or LOOPBACK,
    )


def networks(
    r: IniReader, section: str, key: str, *, allow_any: bool = False
) -> tuple[Network, ...]:
    """A list of networks from ``[section] key``; a bad entry names the key."""
    try:
        return parse_networks(r.string_list(section, key, ()), allow_any=allow_any)
    except ValueError as e:
        raise r.error(section, key, str(e)) from None
