"""Prometheus metrics of the console proxy, on a registry of its own per service.

A private ``CollectorRegistry`` keeps two services in one process (tests) from colliding
and keeps library defaults out of the scrape unless we add them.

With several worker processes a scrape reaches whichever process accepts it, so every
process keeps its values in files of one shared directory (prometheus_client's
multiprocess mode, ``use_shared_directory``) and whichever answers reads them all.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from cpvm.common.contract import Outcome

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SHARED_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def create_shared_directory() -> str:
    """The first of several processes: a fresh, private directory for every process's
    values (systemd's RuntimeDirectory when there is one)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    return tempfile.mkdtemp(prefix="cpvm-metrics-", dir=runtime)


def remove_shared_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def use_shared_directory(path: str) -> None:
    """Keep this process's metric values in files under ``path``; before any metric is
    created (the library chooses its value class once, at import, from the environment).
    Worker processes started afterwards inherit the setting through the environment."""
    os.environ[SHARED_DIR_ENV] = path
    values.ValueClass = values.MultiProcessValue()


def process_gone(path: str, pid: int) -> None:
    """A worker exited: its live gauges (sessions relaying) no longer count."""
    mark_process_dead(pid, path)


class ProxyMetrics:
    """Everything cpvm counts. Relayed bytes are added per session when it ends and, for
    live sessions, when a heartbeat or a scrape asks (``SessionRegistry.count_relayed``),
    so the relay's hot path does no metric work at all."""

    def __init__(
        self, registry: CollectorRegistry | None = None, shared_directory: str | None = None
    ):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.shared_directory = shared_directory
        r = self.registry
        self.active_sessions = Gauge(
            "cpvm_active_sessions",
            "Console sessions relaying now",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.sessions = Counter(
            "cpvm_sessions", "Console sessions ended, by outcome", ["outcome"], registry=r
        )
        self.refused = Counter(
            "cpvm_websocket_refused",
            "WebSocket upgrades refused before redemption",
            ["reason"],
            registry=r,
        )
        self.redemptions = Counter(
            "cpvm_token_redemptions", "Token redemptions by result", ["result"], registry=r
        )
        self.redemption_latency = Histogram(
            "cpvm_token_redemption_seconds",
            "Time to redeem a token with the manager",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handshake_duration = Histogram(
            "cpvm_rfb_handshake_seconds",
            "From WebSocket open to the first relayed byte (redemption, connect, RFB)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_failures = Counter(
            "cpvm_upstream_failures", "VNC server failures by kind", ["kind"], registry=r
        )
        self.manager_failures = Counter(
            "cpvm_manager_failures", "Failed calls to the manager", ["call"], registry=r
        )
        relayed = Counter(
            "cpvm_relayed_bytes",
            "Bytes relayed, ended and live sessions together",
            ["direction"],
            registry=r,
        )
        self._recording_metrics(r)
        self.relayed_to_client = relayed.labels(direction="to_client")
        self.relayed_to_server = relayed.labels(direction="to_server")
        for outcome in Outcome:
            self.sessions.labels(outcome=outcome.report)

    def _recording_metrics(self, r: CollectorRegistry) -> None:
        """Session recordings closed, by whether they are complete, and their bytes."""
        self.recordings = Counter(
            "cpvm_recordings", "Session recordings closed, by result", ["result"], registry=r
        )
        for result in ("complete", "incomplete"):
            self.recordings.labels(result=result)
        self.recorded_bytes = Counter(
            "cpvm_recorded_bytes", "Bytes written to closed recordings", registry=r
        )

    def exposition_registry(self) -> CollectorRegistry:
        """What ``/metrics`` serves: this process's registry, or every process's values."""
        if self.shared_directory is None:
            return self.registry
        shared = CollectorRegistry()
        MultiProcessCollector(shared, path=self.shared_directory)
        return shared
