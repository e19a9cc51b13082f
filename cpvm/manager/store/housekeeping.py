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
    tx: Tx,
    proxy_id: str,
    worker: int,
    active: list[str],
    acquired_before: float,
    now: float,
    keep_token: bool = False,
) -> list[SessionRecord]:
    """End the sessions a proxy process no longer has (it crashed or restarted).

    Only sessions redeemed (or resumed) through this worker before ``acquired_before``
    count: a session redeemed just now may be missing from a heartbeat built a moment
    before. ``keep_token``: the reconnect window is on (see :func:`_end_lost`).
    """
    rows = tx.execute(
        "SELECT id FROM console_sessions WHERE proxy_id = ? AND worker = ? "
        "AND ended_at IS NULL AND acquired_at IS NOT NULL "
        "AND COALESCE(resumed_at, acquired_at) < ?",
        (proxy_id, worker, acquired_before),
    ).fetchall()
    live = set(active)
    return _end_lost(tx, [sid for (sid,) in rows if sid not in live], now, keep_token)


def _end_lost(
    tx: Tx, session_ids: list[str], now: float, keep_token: bool = False
) -> list[SessionRecord]:
    """End sessions whose proxy process is gone (``proxy_lost``); their records.

    An unclean end: with the reconnect window on (``keep_token``) the token's hash stays
    so the same browser can resume; cleanup forgets it once the window has passed.
    """
    forget = "" if keep_token else ", token_hash = NULL, extra_hash = NULL"
    lost = []
    for session_id in session_ids:
        tx.execute(
            f"UPDATE console_sessions SET ended_at = ?, end_reason = 'proxy_lost'{forget} "
            "WHERE id = ? AND ended_at IS NULL",
            (now, session_id),
        )
        record = get_session(tx, session_id)
        if record is not None:
            lost.append(record)
    return lost


def cleanup(
    tx: Tx,
    now: float,
    proxy_timeout: float,
    token_grace: float,
    retention: float,
    reconnect_window: float = 0.0,
) -> CleanupResult:
    """End sessions of silent proxies, purge old token hashes, delete old records.

    With a reconnect window, the token of a redeemed session is kept while it is live
    and for the window after its end (only unclean ends keep it that long: the others
    forget it when they end).
    """
    silent = tx.execute(
        "SELECT s.id FROM console_sessions s JOIN proxies p ON p.id = s.proxy_id "
        "WHERE s.ended_at IS NULL AND s.acquired_at IS NOT NULL "
        "AND (p.last_heartbeat IS NULL OR p.last_heartbeat < ?)",
        (now - proxy_timeout,),
    ).fetchall()
    lost = _end_lost(tx, [sid for (sid,) in silent], now, reconnect_window > 0)
    tx.execute(
        "UPDATE console_sessions SET ended_at = expires_at, end_reason = 'expired', "
        "token_hash = NULL, extra_hash = NULL WHERE acquired_at IS NULL AND ended_at IS NULL "
        "AND expires_at < ?",
        (now - token_grace,),
    )
    expired = tx.rowcount
    ended_before = now - reconnect_window if reconnect_window > 0 else None
    purged = _purge_token_hashes(tx, now - token_grace, ended_before)
    tx.execute(
        "DELETE FROM console_sessions WHERE ended_at IS NOT NULL AND ended_at < ?",
        (now - retention,),
    )
    deleted = tx.rowcount
    forget_expired_signatures(tx, now)
    return CleanupResult(lost, expired, purged + expired, deleted)


def _purge_token_hashes(tx: Tx, expired_before: float, ended_before: float | None) -> int:
    """Forget token hashes nobody may present any more; how many. Without a reconnect
    window (``ended_before`` None): every token past its TTL and grace. With one: tokens
    never redeemed past their TTL, and those whose session ended before the window."""
    if not ended_before:
        tx.execute(
            "UPDATE console_sessions SET token_hash = NULL, extra_hash = NULL "
            "WHERE token_hash IS NOT NULL AND expires_at < ?",
            (expired_before,),
        )
    else:
        tx.execute(
            "UPDATE console_sessions SET token_hash = NULL, extra_hash = NULL "
            "WHERE token_hash IS NOT NULL AND ((acquired_at IS NULL AND expires_at < ?) "
            "OR (ended_at IS NOT NULL AND ended_at < ?))",
            (expired_before, ended_before),
        )
    return tx.rowcount
