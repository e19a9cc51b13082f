"""Proxy keys and what the proxies say: creating and revoking keys, their limits,
heartbeats, and the live proxies a new console may be placed on."""

from __future__ import annotations

from typing import Any

from cpvm.manager.db import Tx
from cpvm.manager.proxy_policy import NO_LIMITS, ProxyPolicy, format_networks, policy_from_row
from cpvm.manager.store.records import (
    PROXY_COLS,
    Conflict,
    NotFound,
    Proxy,
    ProxyLoad,
    proxy_from_row,
)


def create_proxy(
    tx: Tx, proxy_id: str, name: str, secret_hash: str, now: float, policy: ProxyPolicy = NO_LIMITS
) -> None:
    """A new proxy key (only its secret's hash is stored) with its limits."""
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
    """Revoke an active proxy key; :class:`NotFound` when there is none."""
    tx.execute(
        "UPDATE proxies SET revoked_at = ? WHERE (name = ? OR id = ?) AND revoked_at IS NULL",
        (now, name_or_id, name_or_id),
    )
    if tx.rowcount != 1:
        raise NotFound(f"no active proxy key {name_or_id!r}")


def list_proxies(tx: Tx) -> list[Proxy]:
    """Every proxy key, revoked ones too, by name."""
    return [
        proxy_from_row(r)
        for r in tx.execute(f"SELECT {PROXY_COLS} FROM proxies ORDER BY name").fetchall()
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
        proxy_from_row(r)
        for r in tx.execute(
            f"SELECT {PROXY_COLS} FROM proxies WHERE revoked_at IS NULL "
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
