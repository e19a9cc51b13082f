"""The VM registry's rows as consoles need them: adding, changing, removing and reading
VMs (the inventory columns are :mod:`cpvm.manager.vm_store`'s)."""

from __future__ import annotations

from typing import Any

from cpvm.manager import vm_store
from cpvm.manager.db import Tx
from cpvm.manager.store.records import VM_COLS, Conflict, NotFound, Vm, vm_from_row


def add_vm(tx: Tx, vm: dict[str, Any], now: float) -> None:
    """Register a VM by hand; :class:`Conflict` when its id is taken."""
    if tx.execute("SELECT 1 FROM vms WHERE id = ?", (vm["id"],)).fetchone():
        raise Conflict(f"VM {vm['id']} already exists")
    # One INSERT for every way a VM arrives (vm_store records where it came from).
    vm_store.insert_vm(tx, vm, vm_store.MANUAL, now)


def update_vm(tx: Tx, vm_id: str, changes: dict[str, Any], now: float) -> None:
    """Change the editable columns (``vm_store.EDITABLE``) of a VM."""
    unknown = set(changes) - set(vm_store.EDITABLE)
    if unknown:
        raise ValueError(f"cannot update {sorted(unknown)}")
    sets = ", ".join(f"{k} = ?" for k in changes)
    params = list(changes.values()) + [now, vm_id]
    tx.execute(f"UPDATE vms SET {sets}{', ' if sets else ''}updated_at = ? WHERE id = ?", params)
    if tx.rowcount != 1:
        raise NotFound(f"no VM {vm_id}")


def remove_vm(tx: Tx, vm_id: str) -> None:
    """Unregister a VM; :class:`NotFound` when there is none."""
    tx.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
    if tx.rowcount != 1:
        raise NotFound(f"no VM {vm_id}")


def get_vm(tx: Tx, vm_id: str) -> Vm | None:
    """The VM with its owner's name, or None."""
    row = tx.execute(
        f"SELECT {VM_COLS} FROM vms v JOIN accounts a ON a.id = v.owner_id WHERE v.id = ?",
        (vm_id,),
    ).fetchone()
    return vm_from_row(row) if row else None


def list_vms(tx: Tx) -> list[Vm]:
    """Every VM, by name."""
    return [
        vm_from_row(r)
        for r in tx.execute(
            f"SELECT {VM_COLS} FROM vms v JOIN accounts a ON a.id = v.owner_id ORDER BY v.name"
        ).fetchall()
    ]
