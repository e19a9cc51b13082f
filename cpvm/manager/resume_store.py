"""The reconnect window's SQL: what a resume decision reads, and the one write that
makes it stick (``docs/architecture.md`` section 7).

Like :mod:`cpvm.manager.store`, every function takes a :class:`cpvm.manager.db.Tx` and
runs inside the caller's transaction (the redemption's).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.manager.db import Tx
from cpvm.manager.resume import Ended


@dataclass(frozen=True)
class ResumeFacts:
    """A redeemed session as a resume decision needs it, and the values the conditional
    write re-checks."""

    ended: Ended
    reconnects: int


def resume_facts(tx: Tx, session_id: str) -> ResumeFacts | None:
    """Read only when a used token is presented again (rare): the first redemption's
    path stays one statement shorter."""
    row = tx.execute(
        "SELECT ended_at, end_reason, acquired_at, browser_hash, terminate_requested_at, "
        "bound_address, reconnects FROM console_sessions "
        "WHERE id = ? AND acquired_at IS NOT NULL",
        (session_id,),
    ).fetchone()
    if row is None:
        return None
    ended_at, reason, acquired_at, browser_hash, terminate_at, bound, reconnects = row
    return ResumeFacts(
        Ended(
            ended_at=ended_at,
            end_reason=reason,
            acquired_at=acquired_at,
            browser_hash=browser_hash,
            terminate_requested=terminate_at is not None,
            bound_address=bound,
        ),
        int(reconnects or 0),
    )


def resume_session(
    tx: Tx,
    session_id: str,
    facts: ResumeFacts,
    client_address: str,
    worker: int,
    now: float,
) -> int | None:
    """Reopen the session ``facts`` describes; the new reconnect count, or None when
    another transaction changed it since it was read (a resume by another manager, a
    late end report turning a guessed ``proxy_lost`` into a clean end, a termination).

    The conditional UPDATE is the whole guarantee: under PostgreSQL's READ COMMITTED a
    second writer waits for the row and re-checks the WHERE on its new version, so of two
    managers that both decided "resume", exactly one changes the row.
    """
    tx.execute(
        "UPDATE console_sessions SET ended_at = NULL, end_reason = NULL, "
        "reconnects = reconnects + 1, resumed_at = ?, client_address = ?, worker = ? "
        "WHERE id = ? AND ended_at IS NOT NULL AND end_reason = ? AND reconnects = ? "
        "AND terminate_requested_at IS NULL",
        (now, client_address, worker, session_id, facts.ended.end_reason, facts.reconnects),
    )
    if tx.rowcount != 1:
        return None
    return facts.reconnects + 1
