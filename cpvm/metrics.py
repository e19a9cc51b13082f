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
        self.manager_failures = Counter(
            "cpvm_manager_failures", "Failed calls to the manager", ["call"], registry=r)
        for outcome in Outcome:
            self.sessions.labels(outcome=outcome.report)

    def add_relayed_bytes(self, totals) -> None:
        """Expose ``totals() -> (to_client, to_server)`` (ended and live sessions) as the
        relayed-bytes counter, read at scrape time."""

        class _Bytes:
            def collect(self):
                fam = CounterMetricFamily(
                    "cpvm_relayed_bytes", "Bytes relayed, ended and live sessions together",
                    labels=["direction"])
                to_client, to_server = totals()
                fam.add_metric(["to_client"], to_client)
                fam.add_metric(["to_server"], to_server)
                yield fam

        self.registry.register(_Bytes())
