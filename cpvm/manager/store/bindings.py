"""The proxies' instance bindings (:mod:`cpvm.manager.instances`): which running cpvm
holds each proxy key, and the last one refused for it."""

from __future__ import annotations

from cpvm.manager.db import Tx
from cpvm.manager.instances import InstanceBinding

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
    """Every key's binding, by proxy id."""
    return {
        r[0]: InstanceBinding(*r)
        for r in tx.execute(f"SELECT {_BINDING_COLS} FROM proxies").fetchall()
    }
