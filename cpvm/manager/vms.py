"""Adding, changing and removing VMs by hand: one set of rules for the admin CLI
(``cpvm-manager-admin vm add|update|remove``) and the API (``addConsoleVirtualMachine``,
``updateConsoleVirtualMachine``, ``removeConsoleVirtualMachine``).

Values arrive as text (command line, query string); :func:`parse_fields` checks each and
raises :class:`VmError` naming the parameter. :func:`add`, :func:`update` and
:func:`remove` run in one transaction and return a :class:`VmChange` for the audit log,
which names the fields changed, never a password's value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from cpvm.common.contract import VIEWER_POLICIES, VNC_TLS_MODES
from cpvm.manager import store, vm_store
from cpvm.manager.db import Tx
from cpvm.manager.proxy_policy import public_host_problem
from cpvm.manager.secrets_box import SecretBox

STATES = ("Running", "Stopped")  # what a person or an orchestrator may set
TLS_MODES = VNC_TLS_MODES
MAX_NAME = 255
MAX_PASSWORD = 255  # VNC authentication uses the first 8 characters; the rest is kept

audit = Logger(namespace="cpvm.audit")

# Field name -> the parameter that carries it (API name, CLI option).
PARAMETERS = {
    "id": ("id", "--id"),
    "name": ("name", "--name"),
    "owner": ("account", "--owner"),
    "vnc_host": ("vnchost", "--vnc-host"),
    "vnc_port": ("vncport", "--vnc-port"),
    "vnc_password": ("vncpassword", "--vnc-password-file"),
    "vnc_tls": ("vnctls", "--tls"),
    "vnc_ca_pem": ("vnccacertificate", "--ca-file"),
    "vnc_server_name": ("vncservername", "--server-name"),
    "state": ("state", "--state"),
    "viewer_policy": ("viewerpolicy", "--viewer-policy"),
}
# --viewer-policy default: back to the manager's [sessions] viewer_policy.
POLICY_DEFAULT = "default"
REQUIRED = ("name", "owner", "vnc_host", "vnc_port")


class VmError(ValueError):
    """A refused VM change: the API answers 431 (Invalid Parameter), the CLI exits 1."""


@dataclass(frozen=True)
class VmChange:
    """What one add/update/remove did: for the audit log and the answer."""

    action: str  # added, updated, removed
    vm_id: str
    name: str
    owner: str
    fields: tuple[str, ...]  # the fields set or changed (names only)


def _id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise VmError("id must be a UUID") from None


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 1 <= port <= 65535:
        raise VmError("vncport must be an integer from 1 to 65535")
    return port


def _text(field: str, value: str, maximum: int) -> str:
    if not value or len(value) > maximum or any(ord(c) < 32 for c in value):
        raise VmError(f"{PARAMETERS[field][0]} must be 1 to {maximum} printable characters")
    return value


def _host(field: str, value: str) -> str:
    problem = public_host_problem(value)
    if problem is not None:
        name = PARAMETERS[field][0]
        raise VmError(
            f"{name} must be a host name or IP address ({problem.replace('public_host', name)})"
        )
    return value


def _ca(value: str) -> str:
    if "-----BEGIN CERTIFICATE-----" not in value:
        raise VmError("vnccacertificate holds no PEM certificate")
    return value


def _choice(field: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise VmError(f"{PARAMETERS[field][0]} must be one of {', '.join(choices)}")
    return value


def parse_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """Check raw values (absent keys stay absent; ``vnc_password``/``vnc_ca_pem``/
    ``vnc_server_name`` may be None to clear them) and return them typed."""
    out: dict[str, Any] = {}
    for field, value in raw.items():
        if field not in PARAMETERS:
            raise VmError(f"unknown field {field}")
        if value is None:
            if field not in ("vnc_password", "vnc_ca_pem", "vnc_server_name", "viewer_policy"):
                raise VmError(f"{PARAMETERS[field][0]} cannot be removed")
            out[field] = None
        elif field == "id":
            out[field] = _id(value)
        elif field == "vnc_port":
            out[field] = _port(value)
        elif field in ("vnc_host", "vnc_server_name"):
            out[field] = _host(field, value)
        elif field == "vnc_password":
            if not value:
                raise VmError("the VNC password is empty")
            out[field] = _text(field, value, MAX_PASSWORD)
        elif field == "vnc_tls":
            out[field] = _choice(field, value, TLS_MODES)
        elif field == "state":
            out[field] = _choice(field, value, STATES)
        elif field == "viewer_policy":
            choice = _choice(field, value, (*VIEWER_POLICIES, POLICY_DEFAULT))
            out[field] = None if choice == POLICY_DEFAULT else choice
        elif field == "vnc_ca_pem":
            out[field] = _ca(value)
        else:
            out[field] = _text(field, value, MAX_NAME)
    return out


def _check_tls(vnc_tls: str, ca_pem: str | None) -> None:
    if ca_pem is not None and vnc_tls != "x509":
        raise VmError("vnccacertificate applies only with vnctls=x509")


def add(tx: Tx, box: SecretBox, fields: dict[str, Any], source: str, now: float) -> VmChange:
    """Register a VM from checked ``fields`` (:func:`parse_fields`); ``source`` is
    ``manual`` or ``api``."""
    missing = [PARAMETERS[f][0] for f in REQUIRED if f not in fields]
    if missing:
        raise VmError(f"missing parameter {', '.join(missing)}")
    vm_id = fields.get("id") or str(uuid.uuid4())
    if vm_store.vm_source(tx, vm_id) is not None:
        raise VmError(f"VM {vm_id} already exists")
    owner = _owner(tx, fields["owner"])
    tls = fields.get("vnc_tls", "none")
    _check_tls(tls, fields.get("vnc_ca_pem"))
    password = fields.get("vnc_password")
    vm_store.insert_vm(
        tx,
        {
            "id": vm_id,
            "name": fields["name"],
            "owner_id": owner.id,
            "state": fields.get("state", "Running"),
            "vnc_host": fields["vnc_host"],
            "vnc_port": fields["vnc_port"],
            "vnc_password_enc": box.encrypt(password) if password is not None else None,
            "vnc_tls": tls,
            "vnc_ca_pem": fields.get("vnc_ca_pem"),
            "vnc_server_name": fields.get("vnc_server_name"),
            "viewer_policy": fields.get("viewer_policy"),
        },
        source,
        now,
    )
    return VmChange(
        "added",
        vm_id,
        fields["name"],
        owner.name,
        tuple(sorted(f for f in fields if f not in ("id",))),
    )


def _owner(tx: Tx, name_or_id: str) -> store.Account:
    try:
        return store.find_account(tx, name_or_id)
    except store.NotFound:
        raise VmError(f"no account {name_or_id!r}") from None


def _editable(tx: Tx, vm_id: str, discovered_ok: bool = False) -> store.Vm:
    source = vm_store.vm_source(tx, vm_id)
    vm = store.get_vm(tx, vm_id)
    if source is None or vm is None:
        raise VmError(f"no VM {vm_id}")
    if source.startswith(vm_store.LIBVIRT_PREFIX) and not discovered_ok:
        # Discovery would undo the change at its next sync: change it where it lives.
        raise VmError(
            f"VM {vm_id} is discovered from [inventory.libvirt."
            f"{source[len(vm_store.LIBVIRT_PREFIX) :]}]: change it in libvirt"
        )
    return vm


def update(tx: Tx, box: SecretBox, vm_id: str, fields: dict[str, Any], now: float) -> VmChange:
    """Change the given fields of a manual or API VM."""
    if "id" in fields:
        raise VmError("id cannot be changed")
    if not fields:
        raise VmError("nothing to change")
    # Discovery never writes the viewer policy, so it may be set on a discovered VM too.
    vm = _editable(tx, vm_id, discovered_ok=set(fields) == {"viewer_policy"})
    changes: dict[str, Any] = {}
    owner_name = vm.owner_name
    for field, value in fields.items():
        if field == "owner":
            owner = _owner(tx, value)
            changes["owner_id"], owner_name = owner.id, owner.name
        elif field == "vnc_password":
            changes["vnc_password_enc"] = box.encrypt(value) if value is not None else None
        else:
            changes[field] = value
    _check_tls(changes.get("vnc_tls", vm.vnc_tls), changes.get("vnc_ca_pem", vm.vnc_ca_pem))
    store.update_vm(tx, vm.id, changes, now)
    return VmChange(
        "updated", vm.id, changes.get("name", vm.name), owner_name, tuple(sorted(fields))
    )


def remove(tx: Tx, vm_id: str) -> VmChange:
    """Unregister a manual or API VM (its live consoles go on; new ones are refused)."""
    vm = _editable(tx, vm_id)
    store.remove_vm(tx, vm.id)
    return VmChange("removed", vm.id, vm.name, vm.owner_name, ())


def visible(
    tx: Tx,
    caller: store.Account,
    wanted: str | None,
    filters: dict[str, Any],
    offset: int,
    limit: int,
) -> tuple[int, list[vm_store.VmListing]] | None:
    """The page of VMs ``caller`` may list (``wanted``: an account's name or id to narrow to),
    or None when ``wanted`` is no account the caller may see (the answer never says which)."""
    if wanted:
        try:
            target = store.find_account(tx, wanted)
        except store.NotFound:
            return None
        if not caller.is_admin and target.id != caller.id:
            return None
        filters = {**filters, "owner_id": target.id}
    elif not caller.is_admin:
        filters = {**filters, "owner_id": caller.id}
    return vm_store.list_vms(tx, filters, offset, limit)


def log_change(change: VmChange, by: str, source: str) -> None:
    """One audit line per change: who, what, which fields (never a password's value)."""
    audit.info(
        "VM {vm} ({vm_name}) {action} by {by} via {via}; owner {owner}; fields {changed}",
        audit=True,
        event=f"vm_{change.action}",
        vm=change.vm_id,
        vm_name=change.name,
        action=change.action,
        by=by,
        via=source,
        owner=change.owner,
        changed=",".join(change.fields) or "-",
    )
