"""Prometheus metrics of one manager service (a private registry per instance)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ManagerMetrics:
    """The counters and histograms the manager exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tokens_issued = Counter(
            "cpvm_manager_tokens_issued",
            "One-time console tokens issued",
            registry=self.registry,
        )
        self.redemptions = Counter(
            "cpvm_manager_redemptions",
            "Token redemptions by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.api_requests = Counter(
            "cpvm_manager_api_requests",
            "Public API requests by command and HTTP status",
            ["command", "status"],
            registry=self.registry,
        )
        self.proxy_requests = Counter(
            "cpvm_manager_proxy_requests",
            "Proxy API requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.redemption_seconds = Histogram(
            "cpvm_manager_redemption_seconds",
            "Time to answer a redemption",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.sessions_ended = Counter(
            "cpvm_manager_sessions_ended",
            "Console sessions ended by reason",
            ["reason"],
            registry=self.registry,
        )
        self.instance_conflicts = Counter(
            "cpvm_manager_instance_conflicts",
            "Proxy API calls refused because another running cpvm instance holds the key",
            ["endpoint"],
            registry=self.registry,
        )
