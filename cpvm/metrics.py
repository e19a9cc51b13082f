"""Prometheus metrics of the console proxy, on a registry of its own per service.

A private ``CollectorRegistry`` keeps two services in one process (tests, workers) from
colliding and keeps library defaults out of the scrape unless we add them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from cpvm.outcome import Outcome

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ProxyMetrics:
    """Everything cpvm counts. Byte counters are read from the live sessions at scrape
    time, so the relay's hot path does no metric work at all."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_sessions = Gauge(
            "cpvm_active_sessions", "Console sessions relaying now", registry=r)
        self.sessions = Counter(
            "cpvm_sessions", "Console sessions ended, by outcome", ["outcome"], registry=r)
        self.refused = Counter(
            "cpvm_websocket_refused", "WebSocket upgrades refused before redemption",
            ["reason"], registry=r)
        self.redemptions = Counter(
            "cpvm_token_redemptions", "Token redemptions by result", ["result"], registry=r)
        self.redemption_latency = Histogram(
            "cpvm_token_redemption_seconds", "Time to redeem a token with the manager",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.handshake_duration = Histogram(
            "cpvm_rfb_handshake_seconds",
            "From WebSocket open to the first relayed byte (redemption, connect, RFB)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.upstream_failures = Counter(
            "cpvm_upstream_failures", "VNC server failures by kind", ["kind"], registry=r)
        self.ended_bytes = Counter(
            "cpvm_relayed_bytes_ended", "Bytes relayed by sessions that have ended",
            ["direction"], registry=r)
        self.manager_failures = Counter(
            "cpvm_manager_failures", "Failed calls to the manager", ["call"], registry=r)
        for outcome in Outcome:
            self.sessions.labels(outcome=outcome.report)
        for direction in ("to_client", "to_server"):
            self.ended_bytes.labels(direction=direction)

    def add_live_bytes(self, live) -> None:
        """Register a collector that adds the bytes of live sessions to ended ones."""
        ended = self.ended_bytes

        class _Bytes:
            def collect(self):
                fam = CounterMetricFamily(
                    "cpvm_relayed_bytes",
                    "Bytes relayed, ended and live sessions together",
                    labels=["direction"])
                to_client, to_server = live()
                fam.add_metric(["to_client"],
                               ended.labels(direction="to_client")._value.get() + to_client)
                fam.add_metric(["to_server"],
                               ended.labels(direction="to_server")._value.get() + to_server)
                yield fam

        self.registry.register(_Bytes())
