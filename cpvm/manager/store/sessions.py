"""Console sessions and their one-time tokens: issuing, the redemption's reads and its
single conditional write, end reports, terminate requests, listing."""

from __future__ import annotations

from typing import Any, cast

from cpvm.manager.db import Tx
from cpvm.manager.store.records import (
    SESSION_COLS,
    VM_COLS,
    VM_FIELDS,
    SessionRecord,
    TokenRow,
    vm_from_row,
)


def insert_session(tx: Tx, s: dict[str, Any]) -> None:
    """A new session for an issued token (only the token's hash is stored)."""
    tx.execute(
        "INSERT INTO console_sessions (id, token_hash, extra_hash, expires_at, created_at, "
        "account_id, account_name, vm_id, vm_name, proxy_id, creator_address, bound_address, "
        "view_only) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            s["id"],
            s["token_hash"],
            s["extra_hash"],
            s["expires_at"],
            s["created_at"],
            s["account_id"],
            s["account_name"],
            s["vm_id"],
            s["vm_name"],
            s["proxy_id"],
            s["creator_address"],
            s["bound_address"],
            1 if s.get("view_only") else 0,
        ),
    )


_TOKEN_COLS = (
    "s.id, s.proxy_id, s.expires_at, s.acquired_at, s.ended_at, s.extra_hash, "
    "s.bound_address, s.account_name, s.vm_id"
)
# What _TOKEN_COLS read: TokenRow's fields but the VM.
_TokenCols = tuple[str, str, float, float | None, float | None, str | None, str | None, str, str]
_TOKEN_SQL = (
    # One statement for the token and its VM (the VM may have been removed since: LEFT JOIN).
    f"SELECT {_TOKEN_COLS}, {VM_COLS}, sa.id, sa.disabled, sa.role, s.view_only "
    "FROM console_sessions s "
    "LEFT JOIN vms v ON v.id = s.vm_id LEFT JOIN accounts a ON a.id = v.owner_id "
    "LEFT JOIN accounts sa ON sa.id = s.account_id "
    "WHERE s.token_hash = ?"
)


def token_row(tx: Tx, token_hash: str) -> TokenRow | None:
    """The session of a token hash with its VM and account checks, or None."""
    row = tx.execute(_TOKEN_SQL, (token_hash,)).fetchone()
    if row is None:
        return None
    end = 9 + VM_FIELDS
    vm = vm_from_row(row[9:end]) if row[9] is not None and row[12] is not None else None
    account_id, disabled, role, view_only = row[end : end + 4]
    account_ok = (
        account_id is not None
        and not disabled
        and (role == "admin" or (vm is not None and vm.owner_id == account_id))
    )
    return TokenRow(
        *cast(_TokenCols, row[:9]), vm=vm, account_ok=account_ok, view_only=bool(view_only)
    )


def mark_acquired(
    tx: Tx, session_id: str, client_address: str, now: float, worker: int = 0
) -> bool:
    """The single conditional write that makes redemption one-time; True if we won."""
    tx.execute(
        "UPDATE console_sessions SET acquired_at = ?, client_address = ?, worker = ? "
        "WHERE id = ? AND acquired_at IS NULL AND ended_at IS NULL",
        (now, client_address, worker, session_id),
    )
    return tx.rowcount == 1


def get_session(tx: Tx, session_id: str) -> SessionRecord | None:
    """The session's record, or None."""
    row = tx.execute(
        f"SELECT {SESSION_COLS} FROM console_sessions s LEFT JOIN proxies p "
        "ON p.id = s.proxy_id WHERE s.id = ?",
        (session_id,),
    ).fetchone()
    return SessionRecord(*row) if row else None


def end_session(
    tx: Tx, session_id: str, proxy_id: str, report: dict[str, Any], now: float
) -> SessionRecord | None:
    """Record a proxy's end report. None when the session was not redeemed via this proxy.

    A repeated report is accepted; it only overwrites an end the manager guessed itself
    (``proxy_lost``), never one the proxy already reported.
    """
    record = get_session(tx, session_id)
    if record is None or record.proxy_id != proxy_id or record.acquired_at is None:
        return None
    if record.ended_at is not None and record.end_reason != "proxy_lost":
        return record
    tx.execute(
        "UPDATE console_sessions SET ended_at = ?, end_reason = ?, client_address = "
        "COALESCE(?, client_address), bytes_to_client = ?, bytes_to_server = ?, duration = ?, "
        "token_hash = NULL, extra_hash = NULL WHERE id = ?",
        (
            now,
            report["reason"],
            report.get("client_address"),
            report["bytes_to_client"],
            report["bytes_to_server"],
            report["duration"],
            session_id,
        ),
    )
    return get_session(tx, session_id)


def request_terminate(tx: Tx, session_id: str, now: float) -> SessionRecord | None:
    """Ask for a session's end: a live one at the next heartbeat, a pending one at once."""
    record = get_session(tx, session_id)
    if record is None or record.ended_at is not None:
        return record
    if record.acquired_at is None:
        # Conditional: on PostgreSQL a redemption may commit between the read above and
        # this write (READ COMMITTED re-checks the WHERE on the row it waited for). Ending
        # a session that was just redeemed would leave it live and never terminated.
        tx.execute(
            "UPDATE console_sessions SET ended_at = ?, end_reason = 'terminated', "
            "terminate_requested_at = ?, token_hash = NULL, extra_hash = NULL "
            "WHERE id = ? AND acquired_at IS NULL AND ended_at IS NULL",
            (now, now, session_id),
        )
        if tx.rowcount == 1:
            return get_session(tx, session_id)
    # Live (or redeemed meanwhile): its proxy is asked to end it at the next heartbeat.
    tx.execute(
        "UPDATE console_sessions SET terminate_requested_at = COALESCE("
        "terminate_requested_at, ?) WHERE id = ? AND ended_at IS NULL",
        (now, session_id),
    )
    return get_session(tx, session_id)


def list_sessions(
    tx: Tx,
    *,
    account_id: str | None = None,
    vm_id: str | None = None,
    session_id: str | None = None,
    active_only: bool = False,
    limit: int = 500,
) -> list[SessionRecord]:
    """Sessions matching the filters, newest first (``active_only``: redeemed, not ended)."""
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("s.account_id", account_id), ("s.vm_id", vm_id), ("s.id", session_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if active_only:
        where.append("s.ended_at IS NULL AND s.acquired_at IS NOT NULL")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    params.append(limit)
    rows = tx.execute(
        f"SELECT {SESSION_COLS} FROM console_sessions s LEFT JOIN proxies p "
        f"ON p.id = s.proxy_id{clause} ORDER BY s.created_at DESC, s.id LIMIT ?",
        params,
    ).fetchall()
    return [SessionRecord(*r) for r in rows]
