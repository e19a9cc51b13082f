"""The public API's VM commands: CloudStack's ``listVirtualMachines`` and cpvm's admin
commands for orchestrators (``addConsoleVirtualMachine``, ``updateConsoleVirtualMachine``,
``removeConsoleVirtualMachine``).

:func:`commands` gives the handlers for :class:`cpvm.manager.public_api.PublicApiResource`'s
command table. Each handler is called as ``handler(request, account, params, name)`` with
the authenticated account and the lower-cased parameters, and returns ``(status, body)``
or raises ``ApiError``. The rules of the admin commands are those of the CLI
(:mod:`cpvm.manager.vms`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from twisted.web import server

from cpvm.manager import signing, vm_store, vms
from cpvm.manager.api_errors import ApiError
from cpvm.manager.db import Database
from cpvm.manager.secrets_box import SecretBox
from cpvm.manager.store import Account

DEFAULT_PAGE_SIZE = 500  # CloudStack's default.page.size
MAX_PAGE_SIZE = 500

# CloudStack (RoleBasedAPIAccessChecker -> ApiServer.commandAvailable): a command the
# caller's role may not use is UNSUPPORTED_ACTION_ERROR, 432, with this text.
NOT_AVAILABLE = "The API [{command}] does not exist or is not available for the account {account}."

# Parameter -> field of cpvm.manager.vms (the same rules as the CLI's options).
_FIELD_PARAMS = {
    "name": "name",
    "account": "owner",
    "vnchost": "vnc_host",
    "vncport": "vnc_port",
    "vncpassword": "vnc_password",
    "vnctls": "vnc_tls",
    "vnccacertificate": "vnc_ca_pem",
    "vncservername": "vnc_server_name",
    "state": "state",
    "viewerpolicy": "viewer_policy",  # shared | exclusive | takeover | default
}
# Given empty on update: remove the value.
_CLEARABLE = ("vncpassword", "vnccacertificate", "vncservername")


def run_read(db: Database, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a read-only ``fn(tx, *args)`` on the read-only pool (never behind writers)."""
    return db.read(fn, *args)


def _error(code: int, text: str) -> Exception:
    return ApiError(code, text)


def _vm_json(v: vm_store.VmListing, admin: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": v.id,
        "name": v.name,
        "displayname": v.name,
        "state": v.state,
        "account": v.owner_name,
        "accountid": v.owner_id,
        "hypervisor": v.hypervisor,
        "hostname": v.hostname,
        "created": signing.format_time(v.created_at),
    }
    if admin:
        fields["source"] = v.source  # a cpvm extension: manual, api or libvirt:NAME
        fields["viewerpolicy"] = (
            v.viewer_policy or "default"
        )  # cpvm: see updateConsoleVirtualMachine
    return {k: v for k, v in fields.items() if v is not None}  # CloudStack omits nulls


def _page(p: dict[str, str]) -> tuple[int, int]:
    """(offset, limit) from CloudStack's ``page`` (from 1) and ``pagesize`` (-1: the most)."""

    def number(name: str, default: int) -> int:
        raw = p.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise _error(431, f"Invalid parameter {name} value={raw!r}: not an integer") from None

    size = number("pagesize", DEFAULT_PAGE_SIZE)
    if size == -1:
        size = MAX_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise _error(431, f"Invalid parameter pagesize: from 1 to {MAX_PAGE_SIZE}, or -1")
    page = number("page", 1)
    if page < 1:
        raise _error(431, "Invalid parameter page: must be at least 1")
    return (page - 1) * size, size


class VmCommands:
    """The handlers, over the database and the key box, with the clock for timestamps."""

    def __init__(self, db: Database, box: SecretBox, clock: Any):
        self._db = db
        self._box = box
        self._clock = clock

    def table(self) -> dict[str, Callable[..., Any]]:
        return {
            "listvirtualmachines": self.list_virtual_machines,
            "addconsolevirtualmachine": self.add,
            "updateconsolevirtualmachine": self.update,
            "removeconsolevirtualmachine": self.remove,
        }

    async def list_virtual_machines(
        self, request: server.Request, account: Account, p: dict[str, str], name: str
    ):
        filters: dict[str, Any] = {
            "keyword": p.get("keyword") or None,
            "name": p.get("name") or None,
            "state": p.get("state") or None,
        }
        if p.get("id"):
            if not _is_uuid(p["id"]):
                raise _error(431, "Invalid parameter id value: not a UUID")
            filters["id"] = _checked({"id": p["id"]})["id"]
        offset, limit = _page(p)
        wanted = p.get("account") or p.get("accountid")

        result = await run_read(self._db, vms.visible, account, wanted, filters, offset, limit)
        if result is None:
            # Never says whether another account exists.
            raise _error(431, "Invalid parameter account: no such account")
        total, listed = result
        return 200, {
            "listvirtualmachinesresponse": {
                "count": total,
                "virtualmachine": [_vm_json(v, account.is_admin) for v in listed],
            }
        }

    # Admin commands ---------------------------------------------------------------------

    def _admin_only(self, account: Account, command: str) -> None:
        if not account.is_admin:
            raise _error(432, NOT_AVAILABLE.format(command=command, account=account.name))

    async def add(self, request, account, p, name):
        self._admin_only(account, "addConsoleVirtualMachine")
        _password_not_in_query(request)
        raw = {field: p[param] for param, field in _FIELD_PARAMS.items() if param in p}
        if p.get("id"):
            raw["id"] = p["id"]
        fields = _checked(raw)
        now = self._clock.seconds()
        change = await self._run(vms.add, self._box, fields, vm_store.API, now)
        vms.log_change(change, account.name, "api")
        return 200, {
            "addconsolevirtualmachineresponse": {
                "virtualmachine": {"id": change.vm_id, "name": change.name, "account": change.owner}
            }
        }

    async def update(self, request, account, p, name):
        self._admin_only(account, "updateConsoleVirtualMachine")
        _password_not_in_query(request)
        vm_id = _required_id(p, name)
        raw: dict[str, Any] = {}
        for param, field in _FIELD_PARAMS.items():
            if param in p:
                raw[field] = None if (p[param] == "" and param in _CLEARABLE) else p[param]
        fields = _checked(raw)
        change = await self._run(vms.update, self._box, vm_id, fields, self._clock.seconds())
        vms.log_change(change, account.name, "api")
        return 200, {
            "updateconsolevirtualmachineresponse": {
                "virtualmachine": {"id": change.vm_id, "name": change.name, "account": change.owner}
            }
        }

    async def remove(self, request, account, p, name):
        self._admin_only(account, "removeConsoleVirtualMachine")
        vm_id = _required_id(p, name)
        change = await self._run(vms.remove, vm_id)
        vms.log_change(change, account.name, "api")
        return 200, {"removeconsolevirtualmachineresponse": {"success": True}}

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await self._db.run(fn, *args)
        except vms.VmError as e:
            raise _error(431, f"Invalid parameter: {e}") from None


def _is_uuid(value: str) -> bool:
    try:
        vms.parse_fields({"id": value})
    except vms.VmError:
        return False
    return True


def _required_id(p: dict[str, str], name: str) -> str:
    if not p.get("id"):
        raise _error(431, f"Unable to execute API command {name} due to missing parameter id")
    return _checked({"id": p["id"]})["id"]


def _checked(raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return vms.parse_fields(raw)
    except vms.VmError as e:
        raise _error(431, f"Invalid parameter: {e}") from None


def _password_not_in_query(request: server.Request) -> None:
    """A VNC password travels in a POST body only: a query string ends up in proxies',
    browsers' and servers' logs."""
    query = urlsplit(request.uri or b"").query.decode("utf-8", "replace")
    if any(key.lower() == "vncpassword" for key, _ in parse_qsl(query, keep_blank_values=True)):
        raise _error(
            431, "Invalid parameter vncpassword: send it in a POST body, never in the query string"
        )


def commands(db: Database, box: SecretBox, clock: Any) -> dict[str, Callable[..., Any]]:
    """The VM commands for the public API's command table (lower-case names)."""
    return VmCommands(db, box, clock).table()
