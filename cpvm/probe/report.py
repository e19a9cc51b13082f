"""The probe's result as text, as JSON, or as a Prometheus textfile (node_exporter's
textfile collector), written atomically so a scrape never reads half a file."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from cpvm.probe.legs import Leg, ProbeResult


def as_text(result: ProbeResult) -> str:
    """A few lines for a person: the verdict first, then each leg's time."""
    via = f" through {result.proxy}" if result.proxy else ""
    if result.healthy:
        desktop = f' (desktop "{result.desktop}")' if result.desktop else ""
        lines = [f"cpvm-probe: healthy: VM {result.vm}{via}{desktop}"]
    else:
        assert result.failed is not None
        lines = [
            f"cpvm-probe: FAILED at leg {result.failed.label} ({result.failed.covers}): "
            f"{result.reason}",
            f"  VM {result.vm}{via}; exit status {result.exit_status}",
        ]
    for leg in Leg:
        if leg in result.seconds:
            took = f"{result.seconds[leg]:.3f} s"
        elif leg is result.failed:
            took = "failed"
        else:
            took = "not reached"
        lines.append(f"  {leg.label:<13} {took}")
    return "\n".join(lines) + "\n"


def as_json(result: ProbeResult) -> str:
    """One JSON object: ``healthy``, ``exit_status``, ``failed_leg``, ``reason``,
    ``seconds`` by leg (the legs that finished), ``vm``, ``proxy``, ``desktop``,
    ``first_update_pixels``."""
    return (
        json.dumps(
            {
                "healthy": result.healthy,
                "exit_status": result.exit_status,
                "failed_leg": result.failed.label if result.failed else None,
                "reason": result.reason or None,
                "seconds": {leg.label: round(s, 6) for leg, s in result.seconds.items()},
                "vm": result.vm,
                "proxy": result.proxy,
                "desktop": result.desktop,
                "first_update_pixels": result.pixels,
            },
            sort_keys=True,
        )
        + "\n"
    )


def write_textfile(result: ProbeResult, path: Path, now: float) -> None:
    """Write ``result`` as Prometheus metrics to ``path`` (a temporary file renamed over
    it, so the collector reads the old file or the new one, never a partial one)."""
    registry = CollectorRegistry()
    labels = ["vm"]
    success = Gauge(
        "cpvm_probe_success",
        "1 if the probe reached the first screen update",
        labels,
        registry=registry,
    )
    status = Gauge(
        "cpvm_probe_exit_status", "the probe's exit status (0 healthy)", labels, registry=registry
    )
    when = Gauge(
        "cpvm_probe_last_run_timestamp_seconds", "when the probe ran", labels, registry=registry
    )
    seconds = Gauge(
        "cpvm_probe_leg_seconds",
        "seconds each leg took (legs that finished)",
        ["vm", "leg"],
        registry=registry,
    )
    failed = Gauge(
        "cpvm_probe_leg_failed",
        "1 for the leg that failed, else 0",
        ["vm", "leg"],
        registry=registry,
    )
    success.labels(result.vm).set(1 if result.healthy else 0)
    status.labels(result.vm).set(result.exit_status)
    when.labels(result.vm).set(now)
    for leg in Leg:
        failed.labels(result.vm, leg.label).set(1 if leg is result.failed else 0)
        if leg in result.seconds:
            seconds.labels(result.vm, leg.label).set(result.seconds[leg])
    write_to_textfile(str(path), registry)
