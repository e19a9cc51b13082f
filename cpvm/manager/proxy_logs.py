"""The proxy API's log lines about proxies themselves: capacity claims above a key's
ceiling (once per change), instance takeovers and refused instances. They keep the
broker's namespace (``cpvm.manager.proxy_broker``), where operators already look."""

from __future__ import annotations

from twisted.logger import Logger

from cpvm.manager import instances
from cpvm.manager.metrics import ManagerMetrics

_log = Logger(namespace="cpvm.manager.proxy_broker")


class ClampLog:
    """Logs, once per change, that a heartbeat claimed more than the key's ceiling."""

    def __init__(self) -> None:
        # Proxy id -> the claimed capacity last logged as clamped (one line per change,
        # not one per heartbeat).
        self._clamped: dict[str, int] = {}

    def note(self, proxy_id: str, claimed: int, ceiling: int | None) -> None:
        """A heartbeat of ``proxy_id`` claimed ``claimed`` under ``ceiling`` (None: none)."""
        if ceiling is None or claimed <= ceiling:
            self._clamped.pop(proxy_id, None)
            return
        if self._clamped.get(proxy_id) != claimed:
            self._clamped[proxy_id] = claimed
            _log.warn(
                "proxy {proxy} claims capacity {claimed}, above its key's ceiling: counted "
                "as {ceiling}",
                proxy=proxy_id,
                claimed=claimed,
                ceiling=ceiling,
            )


def takeover(proxy_id: str, event: instances.InstanceEvent) -> None:
    """A new cpvm instance took a silent instance's key over."""
    old = event.binding
    _log.warn(
        "proxy {proxy}: cpvm instance {instance} at {client_address} took the key "
        "over from instance {bound} at {bound_address}, silent for {age:.1f} s",
        proxy=proxy_id,
        instance=event.caller,
        client_address=event.address,
        bound=old.instance_id,
        bound_address=old.address,
        age=event.now - (old.seen_at or event.now),
    )


def instance_refused(
    metrics: ManagerMetrics, proxy_id: str, endpoint: str, refusal: instances.InstanceEvent
) -> None:
    """A call from a second running instance of one proxy key was refused."""
    metrics.instance_conflicts.labels(endpoint).inc()
    if not refusal.worth_logging:
        return
    bound = refusal.binding
    _log.error(
        "proxy {proxy}: refused {endpoint} from cpvm instance {instance} at "
        "{client_address}: the key is in use by instance {bound} at {bound_address}, "
        "last heard {age:.1f} s ago (one proxy key per running cpvm)",
        proxy=proxy_id,
        endpoint=endpoint,
        instance=refusal.caller or "(none sent)",
        client_address=refusal.address,
        bound=bound.instance_id,
        bound_address=bound.address,
        age=refusal.now - (bound.seen_at or refusal.now),
    )
