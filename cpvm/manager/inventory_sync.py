"""One discovery sync in one transaction: the registry's VMs of a libvirt source are made
to match the domains just listed, and nothing else is touched.

A sync is idempotent (the same domains give the same rows, and an unchanged row is not
written), so several managers configured with the same source agree; on PostgreSQL they
also take turns, through an advisory lock per source held for the transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cpvm.manager import store, vm_store
from cpvm.manager.db import Tx
from cpvm.manager.inventory_config import LibvirtSourceConfig
from cpvm.manager.libvirt_domains import Domain, vnc_host
from cpvm.manager.secrets_box import SecretBox, SecretKeyError

HYPERVISOR = "KVM"  # CloudStack's name for QEMU/KVM hosts


class OwnerMissing(Exception):
    """The source's owner account does not exist: nothing is registered."""


@dataclass
class SyncResult:
    """What a sync changed (VM ids), and the domains it left alone (an id owned by
    another source)."""

    added: list[str] = field(default_factory=list)
    updated: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    owner: str = ""


def lock_key(source: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_xact_lock`` of one source."""
    digest = hashlib.sha256(f"cpvm-inventory:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock(tx: Tx, source: str) -> None:
    if tx.kind == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (lock_key(source),))


def _row(
    cfg: LibvirtSourceConfig,
    box: SecretBox,
    owner_id: str,
    hostname: str,
    d: Domain,
    old: vm_store.OwnedVm | None,
) -> dict[str, Any]:
    """The registry row for domain ``d`` (``old``: its row now, whose password ciphertext
    is kept when the password is unchanged)."""
    assert d.vnc is not None
    port = d.vnc.port if d.vnc.port is not None else (old.vnc_port if old else 0)
    password_enc = None
    if d.vnc.password is not None:
        password_enc = (
            old.vnc_password_enc
            if old and _same(box, old.vnc_password_enc, d.vnc.password)
            else box.encrypt(d.vnc.password)
        )
    return {
        "id": d.uuid,
        "name": d.name,
        "owner_id": owner_id,
        "state": "Running" if d.running and d.vnc.port is not None else "Stopped",
        "vnc_host": vnc_host(d.vnc.listen, cfg.vnc_address, cfg.uri),
        "vnc_port": port,
        "vnc_password_enc": password_enc,
        "vnc_tls": cfg.vnc_tls,
        "vnc_ca_pem": cfg.vnc_ca_pem,
        "vnc_server_name": cfg.vnc_server_name,
        "hostname": hostname,
        "hypervisor": HYPERVISOR,
    }


def _same(box: SecretBox, encrypted: str | None, password: str) -> bool:
    if encrypted is None:
        return False
    try:
        return box.decrypt(encrypted) == password
    except SecretKeyError:
        return False


def sync_source(
    tx: Tx,
    cfg: LibvirtSourceConfig,
    box: SecretBox,
    hostname: str,
    domains: Sequence[Domain],
    now: float,
) -> SyncResult:
    """Make the VMs of ``cfg.source`` exactly the VNC domains in ``domains``."""
    _lock(tx, cfg.source)
    try:
        owner = store.find_account(tx, cfg.owner)
    except store.NotFound:
        raise OwnerMissing(cfg.owner) from None
    result = SyncResult(owner=owner.name)
    mine = vm_store.owned_vms(tx, cfg.source)
    seen: set[str] = set()
    for d in domains:
        if d.vnc is None:
            continue
        seen.add(d.uuid)
        result.names[d.uuid] = d.name
        old = mine.get(d.uuid)
        row = _row(cfg, box, owner.id, hostname, d, old)
        if old is None:
            if vm_store.vm_source(tx, d.uuid) is not None:
                result.skipped.append(d.uuid)  # added by hand, by API or another source
                continue
            vm_store.insert_vm(tx, row, cfg.source, now)
            result.added.append(d.uuid)
            continue
        changed = {k: row[k] for k in vm_store.COMPARED if getattr(old, k) != row[k]}
        if changed:
            vm_store.update_owned(tx, d.uuid, cfg.source, changed, now)
            result.updated.append((d.uuid, tuple(sorted(changed))))
    for vm_id, old in mine.items():
        if vm_id not in seen:
            vm_store.delete_owned(tx, vm_id, cfg.source)
            result.removed.append(vm_id)
            result.names[vm_id] = old.name
    return result


def mark_unknown(tx: Tx, source: str, now: float) -> int:
    """The host cannot be reached: its VMs are ``Unknown`` (no new consoles) until the
    next good sync; returns how many changed."""
    _lock(tx, source)
    return vm_store.set_source_state(tx, source, "Unknown", now)
