"""The reconnect window in the redeeming transaction: what a resume decision reads, the
decision (:mod:`cpvm.manager.resume`), and the one write that makes it stick
(``docs/architecture.md`` section 7).

Like :mod:`cpvm.manager.store`, every function takes a :class:`cpvm.manager.db.Tx` and
runs inside the caller's transaction (the redemption's).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.manager.db import Tx
from cpvm.manager.decisions import check_redemption
from cpvm.manager.resume import Ended, Verdict, decide
from cpvm.manager.store import TokenRow


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


@dataclass(frozen=True)
class Resumed:
    """A session reopened: its new reconnect count and what is left of its time limit."""

    reconnects: int
    remaining_duration: float | None


def resume_verdict(
    tx: Tx,
    row: TokenRow,
    *,
    proxy_id: str,
    extra_hash: str,
    browser_hash: str | None,
    client_address: str,
    now: float,
    window: float,
    max_duration: float | None,
) -> tuple[str | None, ResumeFacts | None, Verdict | None]:
    """A used token presented again: ``(None, facts, verdict)`` when its session may
    reopen (:func:`reopen` makes it so), else ``(error, None, verdict or None)``: what
    every redemption checks (proxy, ``extra``, bound address, VM, account), or
    ``token_used`` with why not. Reads only."""
    error = check_redemption(
        row,
        proxy_id=proxy_id,
        extra_hash=extra_hash,
        client_address=client_address,
        now=now,
        resuming=True,
    )
    if error is not None:
        return error, None, None
    facts = resume_facts(tx, row.session_id)
    if facts is None:
        return "token_used", None, Verdict(False, "session never redeemed")
    verdict = decide(
        facts.ended,
        browser_hash=browser_hash,
        client_address=client_address,
        now=now,
        window=window,
        max_duration=max_duration,
    )
    if not verdict.resume:
        return "token_used", None, verdict
    return None, facts, verdict


def reopen(
    tx: Tx,
    session_id: str,
    facts: ResumeFacts,
    verdict: Verdict,
    client_address: str,
    worker: int,
    now: float,
) -> Resumed | Verdict:
    """Make a "resume" verdict stick: the session reopened, or why another transaction
    got there first."""
    reconnects = resume_session(tx, session_id, facts, client_address, worker, now)
    if reconnects is None:
        return Verdict(False, "changed by another redemption or report meanwhile")
    return Resumed(reconnects, verdict.remaining_duration)
