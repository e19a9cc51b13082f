"""Viewer policy at redemption: who may hold a VM's console at once.

Per VM (``vms.viewer_policy``, NULL = the manager's ``[sessions] viewer_policy``):

* ``shared``: any number of consoles (nothing to decide, nothing locked);
* ``exclusive``: a full console is refused (``console_in_use``) while another full console
  of the VM is live; view-only consoles always join;
* ``takeover``: a full console ends the VM's live full consoles: they are marked for an
  end with reason ``taken_over``, which their proxy hears in the redemption answer (when
  it holds them) or at its next heartbeat, and closes with code 4023.

The decision runs inside the redeeming transaction, so it is atomic with the token's
single-use write. SQLite serialises every redemption (``BEGIN IMMEDIATE``). PostgreSQL
(READ COMMITTED, several managers) locks the VM's row first (``SELECT … FOR UPDATE``):
two redemptions for one VM then take turns, and the second sees the first's session
once it committed. Shared VMs take no lock.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.common.contract import ViewerPolicy
from cpvm.manager.db import Tx

TAKEN_OVER = "taken_over"  # console_sessions.end_request_reason


@dataclass(frozen=True)
class ViewerDecision:
    """What the policy says about one redemption."""

    policy: ViewerPolicy
    #: A redemption error (``console_in_use``), or None when the console may open.
    error: str | None = None
    #: A full console under ``takeover``: it ends the VM's other full consoles.
    takes_over: bool = False


def policy_of(stored: str | None, default: ViewerPolicy) -> ViewerPolicy:
    """The VM's policy: its own, or the manager's default (also for an unknown value)."""
    try:
        return ViewerPolicy(stored) if stored else default
    except ValueError:
        return default


def _locked_policy(tx: Tx, vm_id: str, default: ViewerPolicy) -> ViewerPolicy:
    """Lock the VM's row (PostgreSQL) and read its policy again under the lock."""
    lock = " FOR UPDATE" if tx.kind == "postgresql" else ""
    row = tx.execute(f"SELECT viewer_policy FROM vms WHERE id = ?{lock}", (vm_id,)).fetchone()
    return policy_of(row[0] if row else None, default)


def _live_full_sessions(tx: Tx, vm_id: str, session_id: str, leaving_too: bool) -> list[str]:
    """The VM's other redeemed, unended full consoles; ``leaving_too``: also those already
    asked to end."""
    leaving = "" if leaving_too else " AND terminate_requested_at IS NULL"
    rows = tx.execute(
        "SELECT id FROM console_sessions WHERE vm_id = ? AND ended_at IS NULL "
        f"AND acquired_at IS NOT NULL AND view_only = 0 AND id <> ?{leaving} ORDER BY id",
        (vm_id, session_id),
    ).fetchall()
    return [r[0] for r in rows]


def check(
    tx: Tx,
    vm_id: str,
    session_id: str,
    view_only: bool,
    stored: str | None,
    default: ViewerPolicy,
) -> ViewerDecision:
    """Before the token is marked used: may this console open under the VM's policy?"""
    policy = policy_of(stored, default)
    if view_only or policy is ViewerPolicy.SHARED:
        return ViewerDecision(policy)
    policy = _locked_policy(tx, vm_id, default)
    if policy is ViewerPolicy.EXCLUSIVE and _live_full_sessions(tx, vm_id, session_id, False):
        return ViewerDecision(policy, "console_in_use")
    return ViewerDecision(policy, takes_over=policy is ViewerPolicy.TAKEOVER)


def take_over(
    tx: Tx, decision: ViewerDecision, vm_id: str, session_id: str, now: float
) -> list[str]:
    """After the token was marked used: under ``takeover``, mark the VM's other live full
    consoles to end as taken over; returns their ids (for the redemption answer)."""
    if not decision.takes_over:
        return []
    ids = _live_full_sessions(tx, vm_id, session_id, True)
    for old in ids:
        tx.execute(
            "UPDATE console_sessions SET terminate_requested_at = COALESCE("
            "terminate_requested_at, ?), end_request_reason = COALESCE(end_request_reason, ?) "
            "WHERE id = ? AND ended_at IS NULL",
            (now, TAKEN_OVER, old),
        )
    return ids


def taken_over_among(tx: Tx, session_ids: list[str]) -> list[str]:
    """Which of ``session_ids`` (asked to end) end because another console took over."""
    if not session_ids:
        return []
    marks = ", ".join("?" for _ in session_ids)
    rows = tx.execute(
        f"SELECT id FROM console_sessions WHERE id IN ({marks}) AND end_request_reason = ? "
        "ORDER BY id",
        (*session_ids, TAKEN_OVER),
    ).fetchall()
    return [r[0] for r in rows]
