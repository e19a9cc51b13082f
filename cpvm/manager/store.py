"""The manager's records and the transactions over them.

Every function takes a :class:`cpvm.manager.db.Tx` as its first argument and runs inside
one transaction, so the service (``Database.run``) and the admin CLI (``run_sync``) share
exactly the same SQL. Rows come back as small frozen dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from cpvm.manager import vm_store
from cpvm.manager.db import Tx
from cpvm.manager.instances import InstanceBinding
from cpvm.manager.proxy_policy import NO_LIMITS, ProxyPolicy, format_networks, policy_from_row

ROLES = ("admin", "user")
VM_STATES = ("Running", "Stopped")


class NotFound(Exception):
    """The named record does not exist."""


class Conflict(Exception):
    """The record already exists."""


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    role: str
    created_at: float
    disabled: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Caller:
    """An authenticated API caller: the account plus its (encrypted) secret."""

    account: Account
    secret_enc: str


@dataclass(frozen=True)
class Vm:
    id: str
    name: str
    owner_id: str
    owner_name: str
    state: str
    vnc_host: str
    vnc_port: int
    vnc_password_enc: str | None
    vnc_tls: str
    vnc_ca_pem: str | None
    vnc_server_name: str | None


@dataclass(frozen=True)
class Proxy:
    id: str
    name: str
    created_at: float
    revoked_at: float | None
    public_host: str | None
    public_port: int | None
    tls: bool
    address: str | None
    capacity: int | None
    active_count: int
    version: str | None
    last_heartbeat: float | None


@dataclass(frozen=True)
class ProxyLoad:
    """A live proxy as the selection sees it."""

    proxy: Proxy
    pending: int  # tokens issued for it, not yet redeemed, not expired
    vm_sessions: int  # live or pending sessions of the requested VM there
    live: int = 0  # redeemed sessions there that have not ended, as this database knows

    @property
    def load(self) -> int:
        # A cpvm with several worker processes heartbeats once per worker, each with its
        # own sessions: the database's count of live sessions is the whole truth there.
        return max(self.proxy.active_count, self.live) + self.pending

    @property
    def capacity(self) -> int:
        return self.proxy.capacity or 0


@dataclass(frozen=True)
class SessionRecord:
    id: str
    created_at: float
    account_id: str
    account_name: str
    vm_id: str
    vm_name: str
    proxy_id: str
    proxy_name: str | None
    creator_address: str | None
    acquired_at: float | None
    client_address: str | None
    ended_at: float | None
    end_reason: str | None
    bytes_to_client: int | None
    bytes_to_server: int | None
    duration: float | None
    terminate_requested_at: float | None
    expires_at: float


# Accounts and API keys -------------------------------------------------------------

_ACCOUNT_COLS = "id, name, role, created_at, disabled"


def _account(row: tuple) -> Account:
    return Account(row[0], row[1], row[2], row[3], bool(row[4]))


def create_account(tx: Tx, account_id: str, name: str, role: str, now: float) -> Account:
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
    row = tx.execute(
        f"SELECT {_ACCOUNT_COLS} FROM accounts WHERE name = ? OR id = ?", (name_or_id, name_or_id)
    ).fetchone()
    if row is None:
        raise NotFound(f"no account {name_or_id!r}")
    return _account(row)


def set_account_disabled(tx: Tx, name_or_id: str, disabled: bool) -> Account:
    """Disable (or enable again) an account: a disabled one can neither call the API nor
    have its pending tokens redeemed."""
    account = find_account(tx, name_or_id)
    tx.execute("UPDATE accounts SET disabled = ? WHERE id = ?", (1 if disabled else 0, account.id))
    return find_account(tx, account.id)


def list_accounts(tx: Tx) -> list[Account]:
    return [
        _account(r)
        for r in tx.execute(f"SELECT {_ACCOUNT_COLS} FROM accounts ORDER BY name").fetchall()
    ]


def create_api_key(
    tx: Tx, key_id: str, account_id: str, api_key: str, secret_enc: str, now: float
) -> None:
    tx.execute(
        "INSERT INTO api_keys (id, account_id, api_key, secret_enc, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (key_id, account_id, api_key, secret_enc, now),
    )


def revoke_api_key(tx: Tx, api_key: str, now: float) -> None:
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
    row = tx.execute(
        "SELECT a.id, a.name, a.role, a.created_at, a.disabled, k.secret_enc "
        "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
        "WHERE k.api_key = ? AND k.revoked_at IS NULL AND a.disabled = 0",
        (api_key,),
    ).fetchone()
    if row is None:
        return None
    return Caller(_account(row[:5]), row[5])


# VMs -------------------------------------------------------------------------------

_VM_COLS = (
    "v.id, v.name, v.owner_id, a.name, v.state, v.vnc_host, v.vnc_port, v.vnc_password_enc, "
    "v.vnc_tls, v.vnc_ca_pem, v.vnc_server_name"
)


def _vm(row: tuple) -> Vm:
    return Vm(*row)


def add_vm(tx: Tx, vm: dict[str, Any], now: float) -> None:
    if tx.execute("SELECT 1 FROM vms WHERE id = ?", (vm["id"],)).fetchone():
        raise Conflict(f"VM {vm['id']} already exists")
    # One INSERT for every way a VM arrives (vm_store records where it came from).
    vm_store.insert_vm(tx, vm, "manual", now)


_VM_UPDATABLE = (
    "name",
    "owner_id",
    "state",
    "vnc_host",
    "vnc_port",
    "vnc_password_enc",
    "vnc_tls",
    "vnc_ca_pem",
    "vnc_server_name",
)


def update_vm(tx: Tx, vm_id: str, changes: dict[str, Any], now: float) -> None:
    unknown = set(changes) - set(_VM_UPDATABLE)
    if unknown:
        raise ValueError(f"cannot update {sorted(unknown)}")
    sets = ", ".join(f"{k} = ?" for k in changes)
    params = list(changes.values()) + [now, vm_id]
    tx.execute(f"UPDATE vms SET {sets}{', ' if sets else ''}updated_at = ? WHERE id = ?", params)
    if tx.rowcount != 1:
        raise NotFound(f"no VM {vm_id}")


def remove_vm(tx: Tx, vm_id: str) -> None:
    tx.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
    if tx.rowcount != 1:
        raise NotFound(f"no VM {vm_id}")


def get_vm(tx: Tx, vm_id: str) -> Vm | None:
    row = tx.execute(
        f"SELECT {_VM_COLS} FROM vms v JOIN accounts a ON a.id = v.owner_id WHERE v.id = ?",
        (vm_id,),
    ).fetchone()
    return _vm(row) if row else None


def list_vms(tx: Tx) -> list[Vm]:
    return [
        _vm(r)
        for r in tx.execute(
            f"SELECT {_VM_COLS} FROM vms v JOIN accounts a ON a.id = v.owner_id ORDER BY v.name"
        ).fetchall()
    ]


# Proxies ---------------------------------------------------------------------------

_PROXY_COLS = (
    "id, name, created_at, revoked_at, public_host, public_port, tls, address, capacity, "
    "active_count, version, last_heartbeat"
)


def _proxy(row: tuple) -> Proxy:
    r = list(row)
    r[6] = bool(r[6])
    return Proxy(*r)


def create_proxy(
    tx: Tx, proxy_id: str, name: str, secret_hash: str, now: float, policy: ProxyPolicy = NO_LIMITS
) -> None:
    if tx.execute("SELECT 1 FROM proxies WHERE name = ?", (name,)).fetchone():
        raise Conflict(f"proxy {name!r} already exists")
    tx.execute(
        "INSERT INTO proxies (id, name, secret_hash, created_at, active_count, max_capacity, "
        "allowed_networks) VALUES (?, ?, ?, ?, 0, ?, ?)",
        (
            proxy_id,
            name,
            secret_hash,
            now,
            policy.max_capacity,
            format_networks(policy.allowed_networks),
        ),
    )


# ``set_proxy_policy``: leave this limit as it is.
KEEP: Any = object()


def set_proxy_policy(
    tx: Tx, name_or_id: str, *, max_capacity: Any = KEEP, allowed_networks: Any = KEEP
) -> ProxyPolicy:
    """Change an active proxy key's limits (``None`` lifts one); returns the new policy.

    A lowered ceiling applies at once: the capacity the last heartbeat claimed is clamped
    too, so no new console goes beyond it before the next beat.
    """
    row = tx.execute(
        "SELECT id, max_capacity, allowed_networks FROM proxies "
        "WHERE (name = ? OR id = ?) AND revoked_at IS NULL",
        (name_or_id, name_or_id),
    ).fetchone()
    if row is None:
        raise NotFound(f"no active proxy key {name_or_id!r}")
    proxy_id, ceiling, allowed = row
    if max_capacity is not KEEP:
        ceiling = max_capacity
    if allowed_networks is not KEEP:
        allowed = format_networks(allowed_networks)
    tx.execute(
        "UPDATE proxies SET max_capacity = ?, allowed_networks = ? WHERE id = ?",
        (ceiling, allowed, proxy_id),
    )
    if ceiling is not None:
        tx.execute(
            "UPDATE proxies SET capacity = ? WHERE id = ? AND capacity > ?",
            (ceiling, proxy_id, ceiling),
        )
    return policy_from_row(ceiling, allowed)


def proxy_policies(tx: Tx) -> dict[str, ProxyPolicy]:
    """Every proxy key's limits, by proxy id."""
    return {
        r[0]: policy_from_row(r[1], r[2])
        for r in tx.execute("SELECT id, max_capacity, allowed_networks FROM proxies").fetchall()
    }


def revoke_proxy(tx: Tx, name_or_id: str, now: float) -> None:
    tx.execute(
        "UPDATE proxies SET revoked_at = ? WHERE (name = ? OR id = ?) AND revoked_at IS NULL",
        (now, name_or_id, name_or_id),
    )
    if tx.rowcount != 1:
        raise NotFound(f"no active proxy key {name_or_id!r}")


def list_proxies(tx: Tx) -> list[Proxy]:
    return [
        _proxy(r) for r in tx.execute(f"SELECT {_PROXY_COLS} FROM proxies ORDER BY name").fetchall()
    ]


def proxy_key_record(tx: Tx, proxy_id: str) -> tuple[str, ProxyPolicy] | None:
    """The stored hash of an active proxy key and its limits, or None when unknown or
    revoked."""
    row = tx.execute(
        "SELECT secret_hash, max_capacity, allowed_networks FROM proxies "
        "WHERE id = ? AND revoked_at IS NULL",
        (proxy_id,),
    ).fetchone()
    return (row[0], policy_from_row(row[1], row[2])) if row else None


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


def heartbeat(tx: Tx, proxy_id: str, beat: dict[str, Any], now: float) -> list[str]:
    """Record a heartbeat; returns the live sessions an administrator asked to end."""
    tx.execute(
        "UPDATE proxies SET public_host = ?, public_port = ?, tls = ?, address = ?, "
        "capacity = ?, active_count = ?, version = ?, last_heartbeat = ? WHERE id = ?",
        (
            beat["public_host"],
            beat["public_port"],
            1 if beat["tls"] else 0,
            beat["address"],
            beat["capacity"],
            beat["active_count"],
            beat["version"],
            now,
            proxy_id,
        ),
    )
    rows = tx.execute(
        "SELECT id FROM console_sessions WHERE proxy_id = ? AND ended_at IS NULL "
        "AND terminate_requested_at IS NOT NULL ORDER BY id",
        (proxy_id,),
    ).fetchall()
    return [r[0] for r in rows]


def live_proxies(tx: Tx, now: float, proxy_timeout: float, vm_id: str) -> list[ProxyLoad]:
    """Proxies that heartbeated within ``proxy_timeout``, with their pending load."""
    proxies = [
        _proxy(r)
        for r in tx.execute(
            f"SELECT {_PROXY_COLS} FROM proxies WHERE revoked_at IS NULL "
            "AND last_heartbeat IS NOT NULL AND last_heartbeat >= ? AND public_host IS NOT NULL",
            (now - proxy_timeout,),
        ).fetchall()
    ]
    if not proxies:
        return []
    pending = dict(
        tx.execute(
            "SELECT proxy_id, COUNT(*) FROM console_sessions WHERE acquired_at IS NULL "
            "AND ended_at IS NULL AND expires_at >= ? GROUP BY proxy_id",
            (now,),
        ).fetchall()
    )
    live = dict(
        tx.execute(
            "SELECT proxy_id, COUNT(*) FROM console_sessions WHERE acquired_at IS NOT NULL "
            "AND ended_at IS NULL GROUP BY proxy_id"
        ).fetchall()
    )
    vm_sessions = dict(
        tx.execute(
            "SELECT proxy_id, COUNT(*) FROM console_sessions WHERE vm_id = ? AND ended_at IS NULL "
            "AND (acquired_at IS NOT NULL OR expires_at >= ?) GROUP BY proxy_id",
            (vm_id, now),
        ).fetchall()
    )
    return [
        ProxyLoad(
            p, int(pending.get(p.id, 0)), int(vm_sessions.get(p.id, 0)), int(live.get(p.id, 0))
        )
        for p in proxies
    ]


# Instance binding (cpvm/manager/instances.py) --------------------------------------

_BINDING_COLS = (
    "id, instance_id, instance_seen_at, instance_address, refused_instance_id, "
    "refused_at, refused_address"
)


def instance_binding(tx: Tx, proxy_id: str, *, lock: bool = True) -> InstanceBinding | None:
    """The key's binding; with ``lock``, locked for this transaction on PostgreSQL (two
    instances beating at once must not both take over). SQLite's transactions are
    serialised anyway."""
    lock_sql = " FOR UPDATE" if lock and tx.kind == "postgresql" else ""
    row = tx.execute(
        f"SELECT {_BINDING_COLS} FROM proxies WHERE id = ?{lock_sql}", (proxy_id,)
    ).fetchone()
    return InstanceBinding(*row) if row else None


def bind_instance(tx: Tx, proxy_id: str, instance_id: str, address: str | None, now: float) -> None:
    """The key's instance is ``instance_id``, seen now."""
    tx.execute(
        "UPDATE proxies SET instance_id = ?, instance_seen_at = ?, instance_address = ? "
        "WHERE id = ?",
        (instance_id, now, address, proxy_id),
    )


def claim_instance(
    tx: Tx, proxy_id: str, instance_id: str, address: str | None, now: float
) -> bool:
    """Bind a key nobody holds, unless another transaction just did; True if we did."""
    tx.execute(
        "UPDATE proxies SET instance_id = ?, instance_seen_at = ?, instance_address = ? "
        "WHERE id = ? AND instance_id IS NULL",
        (instance_id, now, address, proxy_id),
    )
    return tx.rowcount == 1


def refuse_instance(
    tx: Tx, proxy_id: str, instance_id: str | None, address: str | None, now: float
) -> None:
    """Remember the last instance refused for this key (for ``proxy list``)."""
    tx.execute(
        "UPDATE proxies SET refused_instance_id = ?, refused_at = ?, refused_address = ? "
        "WHERE id = ?",
        (instance_id, now, address, proxy_id),
    )


def list_bindings(tx: Tx) -> dict[str, InstanceBinding]:
    return {
        r[0]: InstanceBinding(*r)
        for r in tx.execute(f"SELECT {_BINDING_COLS} FROM proxies").fetchall()
    }


# Console sessions --------------------------------------------------------------------


def insert_session(tx: Tx, s: dict[str, Any]) -> None:
    tx.execute(
        "INSERT INTO console_sessions (id, token_hash, extra_hash, expires_at, created_at, "
        "account_id, account_name, vm_id, vm_name, proxy_id, creator_address, bound_address) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        ),
    )


@dataclass(frozen=True)
class TokenRow:
    """What a redemption needs to decide, read in the redeeming transaction."""

    session_id: str
    proxy_id: str
    expires_at: float
    acquired_at: float | None
    ended_at: float | None
    extra_hash: str | None
    bound_address: str | None
    account_name: str
    vm_id: str
    vm: Vm | None
    # The token's account still exists, is not disabled, and is an admin or still owns
    # the VM: read in the redeeming transaction, so a change made after the token was
    # issued counts.
    account_ok: bool = True


_TOKEN_COLS = (
    "s.id, s.proxy_id, s.expires_at, s.acquired_at, s.ended_at, s.extra_hash, "
    "s.bound_address, s.account_name, s.vm_id"
)
# What _TOKEN_COLS read: TokenRow's fields but the VM.
_TokenCols = tuple[str, str, float, float | None, float | None, str | None, str | None, str, str]
_TOKEN_SQL = (
    # One statement for the token and its VM (the VM may have been removed since: LEFT JOIN).
    f"SELECT {_TOKEN_COLS}, {_VM_COLS}, sa.id, sa.disabled, sa.role FROM console_sessions s "
    "LEFT JOIN vms v ON v.id = s.vm_id LEFT JOIN accounts a ON a.id = v.owner_id "
    "LEFT JOIN accounts sa ON sa.id = s.account_id "
    "WHERE s.token_hash = ?"
)


def token_row(tx: Tx, token_hash: str) -> TokenRow | None:
    row = tx.execute(_TOKEN_SQL, (token_hash,)).fetchone()
    if row is None:
        return None
    vm = _vm(row[9:20]) if row[9] is not None and row[12] is not None else None
    account_id, disabled, role = row[20:23]
    account_ok = (
        account_id is not None
        and not disabled
        and (role == "admin" or (vm is not None and vm.owner_id == account_id))
    )
    return TokenRow(*cast(_TokenCols, row[:9]), vm=vm, account_ok=account_ok)


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


_SESSION_COLS = (
    "s.id, s.created_at, s.account_id, s.account_name, s.vm_id, s.vm_name, s.proxy_id, p.name, "
    "s.creator_address, s.acquired_at, s.client_address, s.ended_at, s.end_reason, "
    "s.bytes_to_client, s.bytes_to_server, s.duration, s.terminate_requested_at, s.expires_at"
)


def get_session(tx: Tx, session_id: str) -> SessionRecord | None:
    row = tx.execute(
        f"SELECT {_SESSION_COLS} FROM console_sessions s LEFT JOIN proxies p "
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
        f"SELECT {_SESSION_COLS} FROM console_sessions s LEFT JOIN proxies p "
        f"ON p.id = s.proxy_id{clause} ORDER BY s.created_at DESC, s.id LIMIT ?",
        params,
    ).fetchall()
    return [SessionRecord(*r) for r in rows]


@dataclass(frozen=True)
class CleanupResult:
    lost: list[SessionRecord]
    expired: int
    purged_tokens: int
    deleted: int


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
    return CleanupResult(lost, expired, purged + expired, deleted)


def dump_all(tx: Tx, tables: Iterable[str]) -> dict[str, list[tuple]]:
    """Every row of ``tables`` (tests check nothing secret is stored in plain text)."""
    return {t: tx.execute(f"SELECT * FROM {t}").fetchall() for t in tables}
