"""Housekeeping of console sessions: ending those whose proxy process is gone (a
heartbeat that no longer lists them, a proxy gone silent), expiring unredeemed tokens,
purging old token hashes, deleting records past retention and spent signatures past
their expiry."""

from __future__ import annotations

from cpvm.manager.db import Tx
from cpvm.manager.store.records import CleanupResult, SessionRecord
from cpvm.manager.store.replays import forget_expired_signatures
from cpvm.manager.store.sessions import get_session


def reconcile(
    tx: Tx, proxy_id: str, worker: int, active: list[str], acquired_before: float, now: float
) -> list[SessionRecord]:
    """End the sessions a proxy process no longer has (it crashed or restarted).

    Only sessions redeemed through this worker before ``acquired_before`` count: a session
    redeemed just now may be missing from a heartbeat built a moment before.
    """
    rows = tx.execute(
        "SELECT id FROM console_sessions WHERE proxy_id = ? AND worker = ? "
        "AND ended_at IS NULL AND acquired_at IS NOT NULL AND acquired_at < ?",
        (proxy_id, worker, acquired_before),
    ).fetchall()
    live = set(active)
    return _end_lost(tx, [sid for (sid,) in rows if sid not in live], now)


def _end_lost(tx: Tx, session_ids: list[str], now: float) -> list[SessionRecord]:
    """End sessions whose proxy process is gone (``proxy_lost``); their records."""
    lost = []
    for session_id in session_ids:
        tx.execute(
            "UPDATE console_sessions SET ended_at = ?, end_reason = 'proxy_lost', "
            "token_hash = NULL, extra_hash = NULL WHERE id = ? AND ended_at IS NULL",
            (now, session_id),
        )
        record = get_session(tx, session_id)
        if record is not None:
            lost.append(record)
    return lost


def cleanup(
    tx: Tx, now: float, proxy_timeout: float, token_grace: float, retention: float
) -> CleanupResult:
    """End sessions of silent proxies, purge old token hashes, delete old records."""
    silent = tx.execute(
        "SELECT s.id FROM console_sessions s JOIN proxies p ON p.id = s.proxy_id "
        "WHERE s.ended_at IS NULL AND s.acquired_at IS NOT NULL "
        "AND (p.last_heartbeat IS NULL OR p.last_heartbeat < ?)",
        (now - proxy_timeout,),
    ).fetchall()
    lost = _end_lost(tx, [sid for (sid,) in silent], now)
    tx.execute(
        "UPDATE console_sessions SET ended_at = expires_at, end_reason = 'expired', "
        "token_hash = NULL, extra_hash = NULL WHERE acquired_at IS NULL AND ended_at IS NULL "
        "AND expires_at < ?",
        (now - token_grace,),
    )
    expired = tx.rowcount
    tx.execute(
        "UPDATE console_sessions SET token_hash = NULL, extra_hash = NULL "
        "WHERE token_hash IS NOT NULL AND expires_at < ?",
        (now - token_grace,),
    )
    purged = tx.rowcount
    tx.execute(
        "DELETE FROM console_sessions WHERE ended_at IS NOT NULL AND ended_at < ?",
        (now - retention,),
    )
    deleted = tx.rowcount
    forget_expired_signatures(tx, now)
    return CleanupResult(lost, expired, purged + expired, deleted)
