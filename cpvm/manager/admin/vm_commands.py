"""``cpvm-manager-admin vm …``: the VM registry by hand, through the same rules as the
admin API (:mod:`cpvm.manager.vms`). VNC passwords are read from a file or stdin, never
from the command line."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from typing import Any

from cpvm.common.contract import VIEWER_POLICIES, VNC_TLS_MODES
from cpvm.manager import recording_policy, store, vm_store, vms
from cpvm.manager.admin.context import AdminContext, AdminError, Commands, table
from cpvm.manager.store import recordings as recording_store


def _read_password(a: argparse.Namespace) -> str | None:
    if a.vnc_password_file and a.vnc_password_stdin:
        raise AdminError("give --vnc-password-file or --vnc-password-stdin, not both")
    if a.vnc_password_file:
        try:
            with open(a.vnc_password_file, encoding="utf-8") as f:
                value = f.read().rstrip("\r\n")
        except OSError as e:
            raise AdminError(f"cannot read {a.vnc_password_file}: {e.strerror}") from None
    elif a.vnc_password_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
    else:
        return None
    if not value:
        raise AdminError("the VNC password is empty")
    return value


def _read_ca(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            pem = f.read()
    except OSError as e:
        raise AdminError(f"cannot read {path}: {e.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise AdminError(f"{path} holds no PEM certificate")
    return pem


def _vm_fields(a: argparse.Namespace) -> dict[str, Any]:
    """The options given, as raw fields for :func:`cpvm.manager.vms.parse_fields`."""
    raw: dict[str, Any] = {}
    for field, option in (
        ("name", "name"),
        ("owner", "owner"),
        ("vnc_host", "vnc_host"),
        ("vnc_port", "vnc_port"),
        ("vnc_tls", "tls"),
        ("state", "state"),
        ("viewer_policy", "viewer_policy"),
    ):
        if getattr(a, option) is not None:
            raw[field] = getattr(a, option)
    password = _read_password(a)
    if password is not None:
        raw["vnc_password"] = password
    if getattr(a, "no_vnc_password", False):
        if password is not None:
            raise AdminError("give a new VNC password or --no-vnc-password, not both")
        raw["vnc_password"] = None
    if a.ca_file is not None:
        raw["vnc_ca_pem"] = _read_ca(a.ca_file) if a.ca_file else None
    if a.server_name is not None:
        raw["vnc_server_name"] = a.server_name or None
    return vms.parse_fields(raw)


def _who() -> str:
    try:
        return f"cpvm-manager-admin ({getpass.getuser()})"
    except (KeyError, OSError):
        return "cpvm-manager-admin"


def vm_add(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``vm add``: prints the new VM's id."""
    fields = _vm_fields(a)
    if a.id:
        fields.update(vms.parse_fields({"id": a.id}))
    change = ctx.run(vms.add, ctx.box, fields, vm_store.MANUAL, time.time())
    vms.log_change(change, _who(), "cli")
    _set_record_policy(ctx, change.vm_id, a.record)
    ctx.print(change.vm_id)


def vm_update(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``vm update ID``."""
    vm_id = vms.parse_fields({"id": a.id})["id"]
    fields = _vm_fields(a)
    if fields or a.record is None:
        change = ctx.run(vms.update, ctx.box, vm_id, fields, time.time())
        vms.log_change(change, _who(), "cli")
    _set_record_policy(ctx, vm_id, a.record)
    ctx.print(f"VM {vm_id} updated")


def _set_record_policy(ctx: AdminContext, vm_id: str, choice: str | None) -> None:
    """``--record always|never|default``: whether this VM's sessions are recorded."""
    if choice is None:
        return
    try:
        ctx.run(recording_store.set_vm_policy, vm_id, recording_policy.stored_policy(choice))
    except store.NotFound:
        raise AdminError(f"no VM {vm_id}") from None


def vm_remove(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``vm remove ID``."""
    change = ctx.run(vms.remove, vms.parse_fields({"id": a.id})["id"])
    vms.log_change(change, _who(), "cli")
    ctx.print("VM removed")


def vm_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``vm list``: never the passwords."""
    sources = ctx.run(vm_store.sources)
    record = ctx.run(recording_store.vm_policies)
    rows = [
        (
            v.id,
            v.name,
            v.owner_name,
            v.state,
            f"{v.vnc_host}:{v.vnc_port}",
            "yes" if v.vnc_password_enc else "no",
            v.vnc_tls,
            v.vnc_server_name,
            sources.get(v.id),
            v.viewer_policy or vms.POLICY_DEFAULT,
            record.get(v.id, "default"),
        )
        for v in ctx.run(store.list_vms)
    ]
    table(
        ctx,
        (
            "id",
            "name",
            "owner",
            "state",
            "vnc",
            "password",
            "tls",
            "server_name",
            "source",
            "viewer_policy",
            "record",
        ),
        rows,
        a.json,
    )


def _vm_options(p: argparse.ArgumentParser, update: bool) -> None:
    p.add_argument("--name", required=not update)
    p.add_argument("--owner", required=not update, help="account name or id")
    p.add_argument("--vnc-host", required=not update)
    p.add_argument("--vnc-port", type=int, required=not update)
    p.add_argument("--vnc-password-file", help="file holding the VNC password")
    p.add_argument(
        "--vnc-password-stdin",
        action="store_true",
        help="read the VNC password from the first line of stdin",
    )
    p.add_argument("--tls", choices=VNC_TLS_MODES)
    p.add_argument("--ca-file", help="PEM CA certificate to verify the VNC server (x509)")
    p.add_argument("--server-name", help="name expected in the VNC server certificate")
    p.add_argument("--state", choices=vms.STATES)
    p.add_argument(
        "--viewer-policy",
        choices=(*VIEWER_POLICIES, vms.POLICY_DEFAULT),
        help="who may hold the console at once: shared (any number), exclusive (one full "
        "console, view-only ones may join), takeover (a new full console ends the old); "
        "default: the manager's [sessions] viewer_policy",
    )
    p.add_argument(
        "--record",
        choices=recording_policy.POLICY_CHOICES,
        help="record this VM's console sessions: always, never, or as the default says",
    )


def add_commands(top: Commands) -> None:
    """The ``vm`` group."""
    vm = top.add_parser("vm", help="VM registry").add_subparsers(dest="cmd", required=True)
    p = vm.add_parser("add", help="register a VM (prints its id)")
    p.add_argument("--id", help="VM UUID (default: generated)")
    _vm_options(p, update=False)
    p.set_defaults(func=vm_add)
    p = vm.add_parser("update", help="change a VM")
    p.add_argument("id")
    _vm_options(p, update=True)
    p.add_argument("--no-vnc-password", action="store_true", help="remove the VNC password")
    p.set_defaults(func=vm_update)
    p = vm.add_parser("remove", help="unregister a VM")
    p.add_argument("id")
    p.set_defaults(func=vm_remove)
    vm.add_parser("list", help="list VMs (never passwords)").set_defaults(func=vm_list)
