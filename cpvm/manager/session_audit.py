"""The audit lines and counters of a session's redemption and end, shared by the proxy
side (redemptions, end reports, reconciliation) and the cleanup (sessions of silent
proxies)."""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from cpvm.manager import store
from cpvm.manager.metrics import ManagerMetrics

audit = Logger(namespace="cpvm.audit")


def log_acquired(
    row: store.TokenRow,
    taken_over: list[str],
    waited: float,
    fields: dict[str, Any],
    reconnects: int = 0,
) -> None:
    """A token was redeemed (``reconnects`` > 0: it resumed its session after an unclean
    end, cpvm/manager/resume.py); under viewer policy ``takeover`` it ended ``taken_over``."""
    if reconnects:
        audit.info(
            "session {session} resumed from {client_address} via proxy {proxy} "
            "(reconnect {reconnects})",
            audit=True,
            event="resumed",
            reconnects=reconnects,
            view_only=row.view_only,
            **fields,
        )
    else:
        audit.info(
            "session {session} acquired from {client_address} via proxy {proxy}",
            audit=True,
            event="acquired",
            waited=waited,
            view_only=row.view_only,
            **fields,
        )
    for old in taken_over:
        audit.info(
            "session {old} taken over by session {session}",
            audit=True,
            event="taken_over",
            old=old,
            **fields,
        )


def log_lost(metrics: ManagerMetrics, record: store.SessionRecord, now: float) -> None:
    """A session ended ``proxy_lost``: its proxy went silent or no longer lists it."""
    metrics.sessions_ended.labels("proxy_lost").inc()
    audit.info(
        "session {session} ended: {reason}",
        audit=True,
        event="ended",
        session=record.id,
        reason="proxy_lost",
        account=record.account_name,
        vm=record.vm_id,
        proxy=record.proxy_name,
        client_address=record.client_address,
        duration=now - (record.acquired_at or now),
    )


def log_ended(metrics: ManagerMetrics, record: store.SessionRecord, report: dict[str, Any]) -> None:
    """A session ended as its proxy reported (``report``: a validated end report)."""
    if record.ended_at is None:
        return  # a late report of an earlier connection of a resumed session: ignored
    metrics.sessions_ended.labels(report["reason"]).inc()
    audit.info(
        "session {session} ended: {reason}",
        audit=True,
        event="ended",
        session=record.id,
        reason=report["reason"],
        account=record.account_name,
        vm=record.vm_id,
        proxy=record.proxy_name,
        client_address=record.client_address,
        bytes_to_client=report["bytes_to_client"],
        bytes_to_server=report["bytes_to_server"],
        duration=report["duration"],
        # The file's size, SHA-256, duration and completeness, when it was recorded.
        recording=report.get("recording"),
    )
