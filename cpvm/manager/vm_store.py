"""SQL over the VM registry's inventory columns (migration 6: ``source``, ``hostname``,
``hypervisor``): listing with CloudStack's filters and paging, inserts that record where a
VM came from, and the rows one discovery source owns.

Like :mod:`cpvm.manager.store`, every function takes a :class:`cpvm.manager.db.Tx` first
and runs inside the caller's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpvm.manager.db import Tx

MANUAL = "manual"  # cpvm-manager-admin vm add
API = "api"  # addConsoleVirtualMachine
LIBVIRT_PREFIX = "libvirt:"  # [inventory.libvirt.NAME] -> "libvirt:NAME"


# The columns of ``vms`` that describe a VM (not its id, source or times), once, with who
# may write each: "edit" by hand (cpvm-manager-admin, the admin API: store.update_vm),
# "discovery" a libvirt source for its own VMs (update_owned), and "compare" what a sync
# reads back to decide whether a domain changed (inventory_sync; the hypervisor is the
# same constant for every domain, so it is written but never compared).
VM_COLUMNS: tuple[tuple[str, frozenset[str]], ...] = (
    ("name", frozenset({"edit", "discovery", "compare"})),
    ("owner_id", frozenset({"edit", "discovery", "compare"})),
    ("state", frozenset({"edit", "discovery", "compare"})),
    ("vnc_host", frozenset({"edit", "discovery", "compare"})),
    ("vnc_port", frozenset({"edit", "discovery", "compare"})),
    ("vnc_password_enc", frozenset({"edit", "discovery", "compare"})),
    ("vnc_tls", frozenset({"edit", "discovery", "compare"})),
    ("vnc_ca_pem", frozenset({"edit", "discovery", "compare"})),
    ("vnc_server_name", frozenset({"edit", "discovery", "compare"})),
    ("hostname", frozenset({"discovery", "compare"})),
    ("hypervisor", frozenset({"discovery"})),
    # Set by hand even on a discovered VM (libvirt knows no such thing; discovery leaves it).
    ("viewer_policy", frozenset({"edit"})),
)


def _columns(writer: str) -> tuple[str, ...]:
    return tuple(name for name, writers in VM_COLUMNS if writer in writers)


EDITABLE = _columns("edit")
DISCOVERED = _columns("discovery")
COMPARED = _columns("compare")


@dataclass(frozen=True)
class VmListing:
    """A VM as ``listVirtualMachines`` and the inventory see it: never a VNC secret."""

    id: str
    name: str
    owner_id: str
    owner_name: str
    state: str
    source: str
    hostname: str | None
    hypervisor: str | None
    created_at: float
    viewer_policy: str | None = None  # None: the manager's default


@dataclass(frozen=True)
class OwnedVm:
    """What discovery compares with a domain, for one VM of its own source: the id and
    the ``COMPARED`` columns, in that order."""

    id: str
    name: str
    owner_id: str
    state: str
    vnc_host: str
    vnc_port: int
    vnc_password_enc: str | None
    vnc_tls: str
    vnc_ca_pem: str | None
    vnc_server_name: str | None
    hostname: str | None


_LIST_COLS = (
    "v.id, v.name, v.owner_id, a.name, v.state, v.source, v.hostname, v.hypervisor, v.created_at, "
    "v.viewer_policy"
)


def _filters(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, key in (
        ("v.id", "id"),
        ("v.name", "name"),
        ("v.owner_id", "owner_id"),
        ("v.source", "source"),
    ):
        if filters.get(key) is not None:
            where.append(f"{column} = ?")
            params.append(filters[key])
    if filters.get("state") is not None:
        where.append("LOWER(v.state) = LOWER(?)")
        params.append(filters["state"])
    if filters.get("keyword"):
        # CloudStack's keyword: a substring of the name (LIKE, with its wildcards escaped).
        escaped = filters["keyword"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where.append("LOWER(v.name) LIKE LOWER(?) ESCAPE '\\'")
        params.append(f"%{escaped}%")
    return (f" WHERE {' AND '.join(where)}" if where else ""), params


def list_vms(
    tx: Tx, filters: dict[str, Any], offset: int, limit: int
) -> tuple[int, list[VmListing]]:
    """(how many VMs match in all, the page ``offset``..``offset+limit`` by name then id)."""
    clause, params = _filters(filters)
    base = f"FROM vms v JOIN accounts a ON a.id = v.owner_id{clause}"
    row = tx.execute(f"SELECT COUNT(*) {base}", params).fetchone()
    total = int(row[0]) if row else 0
    rows = tx.execute(
        f"SELECT {_LIST_COLS} {base} ORDER BY v.name, v.id LIMIT ? OFFSET ?",
        [*params, limit, offset],
    ).fetchall()
    return total, [VmListing(*r) for r in rows]


def vm_source(tx: Tx, vm_id: str) -> str | None:
    """The source of VM ``vm_id``, or None when there is no such VM."""
    row = tx.execute("SELECT source FROM vms WHERE id = ?", (vm_id,)).fetchone()
    return row[0] if row else None


def insert_vm(tx: Tx, vm: dict[str, Any], source: str, now: float) -> None:
    """A new VM row recording ``source`` (the caller checked the id is free)."""
    tx.execute(
        "INSERT INTO vms (id, name, owner_id, state, vnc_host, vnc_port, vnc_password_enc, "
        "vnc_tls, vnc_ca_pem, vnc_server_name, created_at, updated_at, source, hostname, "
        "hypervisor, viewer_policy) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            vm["id"],
            vm["name"],
            vm["owner_id"],
            vm["state"],
            vm["vnc_host"],
            vm["vnc_port"],
            vm.get("vnc_password_enc"),
            vm["vnc_tls"],
            vm.get("vnc_ca_pem"),
            vm.get("vnc_server_name"),
            now,
            now,
            source,
            vm.get("hostname"),
            vm.get("hypervisor"),
            vm.get("viewer_policy"),
        ),
    )


def owned_vms(tx: Tx, source: str) -> dict[str, OwnedVm]:
    """Every VM of ``source``, by id."""
    rows = tx.execute(
        f"SELECT id, {', '.join(COMPARED)} FROM vms WHERE source = ?", (source,)
    ).fetchall()
    return {r[0]: OwnedVm(*r) for r in rows}


def set_source_state(tx: Tx, source: str, state: str, now: float) -> int:
    """Every VM of ``source`` to ``state`` (a libvirt host that cannot be reached: Unknown);
    returns how many changed."""
    tx.execute(
        "UPDATE vms SET state = ?, updated_at = ? WHERE source = ? AND state <> ?",
        (state, now, source, state),
    )
    return tx.rowcount


def sources(tx: Tx) -> dict[str, str]:
    """Every VM's source, by id."""
    return {r[0]: r[1] for r in tx.execute("SELECT id, source FROM vms").fetchall()}


def update_owned(tx: Tx, vm_id: str, source: str, changes: dict[str, Any], now: float) -> None:
    """Change a VM of ``source`` (never one of another source)."""
    unknown = set(changes) - set(DISCOVERED)
    if unknown:
        raise ValueError(f"cannot update {sorted(unknown)}")
    sets = "".join(f"{k} = ?, " for k in changes)
    tx.execute(
        f"UPDATE vms SET {sets}updated_at = ? WHERE id = ? AND source = ?",
        [*changes.values(), now, vm_id, source],
    )


def delete_owned(tx: Tx, vm_id: str, source: str) -> None:
    """Remove a VM of ``source`` (never one of another source)."""
    tx.execute("DELETE FROM vms WHERE id = ? AND source = ?", (vm_id, source))
