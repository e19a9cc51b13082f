"""Accounts and their API keys: creating, disabling, listing, and finding the caller
behind an API key."""

from __future__ import annotations

from cpvm.manager.db import Tx
from cpvm.manager.store.records import (
    ACCOUNT_COLS,
    ROLES,
    Account,
    Caller,
    Conflict,
    NotFound,
    account_from_row,
)


def create_account(tx: Tx, account_id: str, name: str, role: str, now: float) -> Account:
    """A new account; :class:`Conflict` when the name is taken."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if tx.execute("SELECT 1 FROM accounts WHERE name = ?", (name,)).fetchone():
        raise Conflict(f"account {name!r} already exists")
    tx.execute(
        "INSERT INTO accounts (id, name, role, created_at, disabled) VALUES (?, ?, ?, ?, 0)",
        (account_id, name, role, now),
    )
    return Account(account_id, name, role, now, False)


def find_account(tx: Tx, name_or_id: str) -> Account:
    """The account of that name or id; :class:`NotFound` otherwise."""
    row = tx.execute(
        f"SELECT {ACCOUNT_COLS} FROM accounts WHERE name = ? OR id = ?", (name_or_id, name_or_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"no account {name_or_id!r}")
    return account_from_row(row)


def set_account_disabled(tx: Tx, name_or_id: str, disabled: bool) -> Account:
    """Disable (or enable again) an account: a disabled one can neither call the API nor
    have its pending tokens redeemed."""
    account = find_account(tx, name_or_id)
    tx.execute("UPDATE accounts SET disabled = ? WHERE id = ?", (1 if disabled else 0, account.id))
    return find_account(tx, account.id)


def list_accounts(tx: Tx) -> list[Account]:
    """Every account, by name."""
    return [
        account_from_row(r)
        for r in tx.execute(f"SELECT {ACCOUNT_COLS} FROM accounts ORDER BY name").fetchall()
    ]


def create_api_key(
    tx: Tx, key_id: str, account_id: str, api_key: str, secret_enc: str, now: float
) -> None:
    """A new API key for the account (its secret already encrypted)."""
    tx.execute(
        "INSERT INTO api_keys (id, account_id, api_key, secret_enc, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (key_id, account_id, api_key, secret_enc, now),
    )


def revoke_api_key(tx: Tx, api_key: str, now: float) -> None:
    """Revoke an active API key; :class:`NotFound` when there is none."""
    tx.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE api_key = ? AND revoked_at IS NULL",
        (now, api_key),
    )
    if tx.rowcount != 1:
        raise NotFound("no such active API key")


def list_api_keys(tx: Tx) -> list[tuple[str, str, float, float | None]]:
    """(account name, api key, created, revoked) — never the secret."""
    return [
        tuple(r)
        for r in tx.execute(
            "SELECT a.name, k.api_key, k.created_at, k.revoked_at FROM api_keys k "
            "JOIN accounts a ON a.id = k.account_id ORDER BY a.name, k.created_at"
        ).fetchall()
    ]


def lookup_caller(tx: Tx, api_key: str) -> Caller | None:
    """The enabled account behind an active API key, or None."""
    row = tx.execute(
        "SELECT a.id, a.name, a.role, a.created_at, a.disabled, k.secret_enc "
        "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
        "WHERE k.api_key = ? AND k.revoked_at IS NULL AND a.disabled = 0",
        (api_key,),
    ).fetchone()
    if row is None:
        return None
    return Caller(account_from_row(row[:5]), row[5])
