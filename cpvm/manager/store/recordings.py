"""Session recordings in the manager's records (migration 7): the policy per VM and per
account, the redemption's decision, the end report's file summary, retention's deletions
and the one-time playback tickets.

Like the rest of :mod:`cpvm.manager.store`, every function takes a Tx and runs inside the
caller's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cpvm.manager import recording_policy
from cpvm.manager.db import Tx
from cpvm.manager.store.records import NotFound, SessionRecord
from cpvm.manager.store.sessions import end_session as _end_session


@dataclass(frozen=True)
class RecordingRecord:
    """What the manager knows of one session's recording."""

    session_id: str
    proxy_id: str
    account_id: str
    recorded: bool
    size: int | None
    sha256: str | None
    duration: float | None
    complete: bool | None
    deleted_at: float | None

    def listing(self) -> dict[str, Any] | None:
        """The ``recording`` object of listConsoleSessions (None: not recorded)."""
        if not self.recorded:
            return None
        out: dict[str, Any] = {"size": self.size, "sha256": self.sha256, "duration": self.duration}
        if self.complete is not None:
            out["complete"] = self.complete
        if self.deleted_at is not None:
            out["deleted"] = self.deleted_at
        return out


_COLS = (
    "id, proxy_id, account_id, recorded, recording_size, recording_sha256, "
    "recording_duration, recording_complete, recording_deleted_at"
)


def _record(row: tuple) -> RecordingRecord:
    complete = None if row[7] is None else bool(row[7])
    return RecordingRecord(
        row[0], row[1], row[2], bool(row[3]), row[4], row[5], row[6], complete, row[8]
    )


def set_vm_policy(tx: Tx, vm_id: str, policy: str | None) -> None:
    """``always``, ``never`` or None (the default decides) for one VM."""
    tx.execute("UPDATE vms SET record_policy = ? WHERE id = ?", (policy, vm_id))
    if tx.rowcount != 1:
        raise NotFound(f"no VM {vm_id}")


def set_account_policy(tx: Tx, account_id: str, policy: str | None) -> None:
    """``always``, ``never`` or None for one account."""
    tx.execute("UPDATE accounts SET record_policy = ? WHERE id = ?", (policy, account_id))
    if tx.rowcount != 1:
        raise NotFound(f"no account {account_id}")


def policies(tx: Tx, vm_id: str, account_id: str) -> tuple[str | None, str | None]:
    """The VM's and the account's policies (None when unset or gone)."""
    vm = tx.execute("SELECT record_policy FROM vms WHERE id = ?", (vm_id,)).fetchone()
    account = tx.execute(
        "SELECT record_policy FROM accounts WHERE id = ?", (account_id,)
    ).fetchone()
    return (vm[0] if vm else None, account[0] if account else None)


def vm_policies(tx: Tx) -> dict[str, str]:
    """Every VM with a policy set: id → policy."""
    return dict(
        tx.execute("SELECT id, record_policy FROM vms WHERE record_policy IS NOT NULL").fetchall()
    )


def account_policies(tx: Tx) -> dict[str, str]:
    """Every account with a policy set: id → policy."""
    return dict(
        tx.execute(
            "SELECT id, record_policy FROM accounts WHERE record_policy IS NOT NULL"
        ).fetchall()
    )


def mark_recorded(tx: Tx, session_id: str) -> None:
    """The redemption told the proxy to record this session."""
    tx.execute("UPDATE console_sessions SET recorded = 1 WHERE id = ?", (session_id,))


def store_summary(tx: Tx, session_id: str, proxy_id: str, summary: dict[str, Any]) -> None:
    """The end report's ``recording`` object (already validated)."""
    tx.execute(
        "UPDATE console_sessions SET recording_size = ?, recording_sha256 = ?, "
        "recording_duration = ?, recording_complete = ? WHERE id = ? AND proxy_id = ? "
        "AND recorded = 1",
        (
            summary["size"],
            summary["sha256"],
            summary["duration"],
            1 if summary["complete"] else 0,
            session_id,
            proxy_id,
        ),
    )


def mark_deleted(tx: Tx, proxy_id: str, session_ids: list[str], now: float) -> int:
    """The proxy's retention removed these recordings; returns how many were its own."""
    n = 0
    for session_id in session_ids:
        tx.execute(
            "UPDATE console_sessions SET recording_deleted_at = ? WHERE id = ? AND proxy_id = ? "
            "AND recorded = 1 AND recording_deleted_at IS NULL",
            (now, session_id, proxy_id),
        )
        n += tx.rowcount
    return n


def get_recording(tx: Tx, session_id: str) -> RecordingRecord | None:
    """One session's recording facts, or None for an unknown session."""
    row = tx.execute(f"SELECT {_COLS} FROM console_sessions WHERE id = ?", (session_id,)).fetchone()
    return _record(row) if row else None


def recordings_of(tx: Tx, session_ids: list[str]) -> dict[str, RecordingRecord]:
    """The recording facts of several sessions (for a listing)."""
    if not session_ids:
        return {}
    marks = ", ".join("?" for _ in session_ids)
    rows = tx.execute(
        f"SELECT {_COLS} FROM console_sessions WHERE id IN ({marks})", session_ids
    ).fetchall()
    return {row[0]: _record(row) for row in rows}


def insert_ticket(
    tx: Tx,
    *,
    ticket_hash: str,
    session_id: str,
    proxy_id: str,
    created_by: str,
    now: float,
    ttl: float,
) -> None:
    """A one-time playback ticket for a session's recording on ``proxy_id``."""
    tx.execute(
        "INSERT INTO playback_tickets (ticket_hash, session_id, proxy_id, created_by, "
        "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        (ticket_hash, session_id, proxy_id, created_by, now, now + ttl),
    )


def redeem_ticket(tx: Tx, ticket_hash: str, proxy_id: str, now: float) -> tuple[str, str | None]:
    """Spend a ticket presented by ``proxy_id``: ``("ok", session_id)`` exactly once, else
    ``("invalid_ticket" | "wrong_proxy" | "expired_ticket" | "ticket_used", None)``."""
    row = tx.execute(
        "SELECT session_id, proxy_id, expires_at, used_at FROM playback_tickets WHERE ticket_hash = ?",
        (ticket_hash,),
    ).fetchone()
    if row is None:
        return ("invalid_ticket", None)
    session_id, owner, expires_at, used_at = row
    if owner != proxy_id:
        return ("wrong_proxy", None)
    if used_at is not None:
        return ("ticket_used", None)
    if now > expires_at:
        return ("expired_ticket", None)
    # The one conditional write: of two concurrent redemptions only one wins.
    tx.execute(
        "UPDATE playback_tickets SET used_at = ? WHERE ticket_hash = ? AND used_at IS NULL",
        (now, ticket_hash),
    )
    if tx.rowcount != 1:
        return ("ticket_used", None)
    return ("ok", session_id)


def purge_tickets(tx: Tx, now: float, keep: float = 86400.0) -> int:
    """Forget tickets that expired more than ``keep`` seconds ago."""
    tx.execute("DELETE FROM playback_tickets WHERE expires_at < ?", (now - keep,))
    return tx.rowcount


def session_policies(tx: Tx, session_id: str) -> tuple[str | None, str | None]:
    """The policies of a session's VM and account, as they are now."""
    row = tx.execute(
        "SELECT v.record_policy, a.record_policy FROM console_sessions s "
        "LEFT JOIN vms v ON v.id = s.vm_id LEFT JOIN accounts a ON a.id = s.account_id "
        "WHERE s.id = ?",
        (session_id,),
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def proxy_address(tx: Tx, proxy_id: str) -> tuple[str, int, bool, str | None] | None:
    """Where browsers reach a proxy (its last heartbeat): host, port, TLS, address."""
    row = tx.execute(
        "SELECT public_host, public_port, tls, address FROM proxies WHERE id = ? "
        "AND revoked_at IS NULL",
        (proxy_id,),
    ).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None
    return (row[0], int(row[1]), bool(row[2]), row[3])


def decide(tx: Tx, session_id: str, default: str, resumed: bool = False) -> bool:
    """At redemption: whether the session is recorded, by the policy as it is now; the
    record remembers it (the proxy is told in the answer). A resumed session keeps what
    its first redemption decided."""
    if resumed:
        record = get_recording(tx, session_id)
        return record is not None and record.recorded
    recorded = recording_policy.is_recorded(*session_policies(tx, session_id), default)
    if recorded:
        mark_recorded(tx, session_id)
    return recorded


def end_session(
    tx: Tx,
    session_id: str,
    proxy_id: str,
    report: dict[str, Any],
    now: float,
    keeps_token: Callable[[dict[str, Any]], bool],
) -> SessionRecord | None:
    """``store.end_session``, and the recording's summary when the report carries one and
    is of the session's current connection (a resumed session's last file)."""
    record = _end_session(tx, session_id, proxy_id, report, now, keeps_token(report))
    summary = report.get("recording")
    if record is not None and summary is not None:
        if report.get("reconnects", record.reconnects) == record.reconnects:
            store_summary(tx, session_id, proxy_id, summary)
    return record
