"""``cpvm-manager-admin``: accounts, API keys, VMs and proxy keys, straight in the database.

It uses the manager's configuration file, schema migrations and queries, synchronously.
Secrets are printed once, at creation, and never again; VNC passwords are read from a file
or stdin, never from the command line.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from twisted.logger import globalLogPublisher

from cpvm.common import logs
from cpvm.common.contract import VNC_TLS_MODES
from cpvm.common.inifile import ConfigError
from cpvm.manager import db as dbmodule
from cpvm.manager import store, vm_store, vms
from cpvm.manager.config import ManagerConfig, load_config
from cpvm.manager.instances import InstanceBinding
from cpvm.manager.proxy_policy import ProxyPolicy, format_networks, parse_allow
from cpvm.manager.secrets_box import SecretBox, SecretKeyError, sha256_hex
from cpvm.manager.signing import format_time


class AdminError(Exception):
    """A failed admin command: printed, exit status 1."""


class AdminContext:
    """An open database and key box for one CLI run."""

    def __init__(self, config: ManagerConfig, out: TextIO):
        self.config = config
        self.out = out
        self._box: SecretBox | None = None
        dbmodule.migrate(config.database, time.time())
        self.conn = dbmodule.connect_sync(config.database)

    @property
    def box(self) -> SecretBox:
        if self._box is None:
            self._box = SecretBox.from_file(self.config.security.secret_key_file)
        return self._box

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return dbmodule.run_sync(self.conn, self.config.database.kind, fn, *args)

    def print(self, *args: Any) -> None:
        print(*args, file=self.out)

    def close(self) -> None:
        self.conn.close()


def _fmt(t: float | None) -> str:
    return format_time(t) if t is not None else "-"


def _table(
    ctx: AdminContext, header: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool
) -> None:
    if as_json:
        ctx.print(json.dumps([dict(zip(header, r, strict=True)) for r in rows], indent=2))
        return
    cells = [list(header)] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        ctx.print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


# Commands ------------------------------------------------------------------------------


def account_create(ctx: AdminContext, a: argparse.Namespace) -> None:
    role = "admin" if a.admin else "user"
    account = ctx.run(store.create_account, str(uuid.uuid4()), a.name, role, time.time())
    ctx.print(f"account {account.name} ({account.role}) id {account.id}")


def account_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    rows = [
        (x.name, x.id, x.role, _fmt(x.created_at), "yes" if x.disabled else "no")
        for x in ctx.run(store.list_accounts)
    ]
    _table(ctx, ("name", "id", "role", "created", "disabled"), rows, a.json)


def account_disable(ctx: AdminContext, a: argparse.Namespace) -> None:
    account = ctx.run(store.set_account_disabled, a.name, True)
    ctx.print(f"account {account.name} disabled (its API keys and pending tokens stop working)")


def account_enable(ctx: AdminContext, a: argparse.Namespace) -> None:
    account = ctx.run(store.set_account_disabled, a.name, False)
    ctx.print(f"account {account.name} enabled")


def command_line_safe_key(nbytes: int = 48) -> str:
    """A random URL-safe key that does not start with "-" (one in 64 would): operators
    pass API keys as arguments (``key revoke KEY``), where it would read as an option."""
    while True:
        key = secrets.token_urlsafe(nbytes)
        if not key.startswith("-"):
            return key


def key_create(ctx: AdminContext, a: argparse.Namespace) -> None:
    account = ctx.run(store.find_account, a.account)
    api_key = command_line_safe_key()
    secret = command_line_safe_key()
    ctx.run(
        store.create_api_key,
        str(uuid.uuid4()),
        account.id,
        api_key,
        ctx.box.encrypt(secret),
        time.time(),
    )
    if a.json:
        ctx.print(json.dumps({"account": account.name, "apikey": api_key, "secretkey": secret}))
    else:
        ctx.print(f"account:   {account.name}")
        ctx.print(f"apiKey:    {api_key}")
        ctx.print(f"secretKey: {secret}")
        ctx.print("(the secret key is shown only now)")


def key_revoke(ctx: AdminContext, a: argparse.Namespace) -> None:
    ctx.run(store.revoke_api_key, a.apikey, time.time())
    ctx.print("API key revoked")


def key_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    rows = [(n, k, _fmt(c), _fmt(r)) for n, k, c, r in ctx.run(store.list_api_keys)]
    _table(ctx, ("account", "apikey", "created", "revoked"), rows, a.json)


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
    fields = _vm_fields(a)
    if a.id:
        fields.update(vms.parse_fields({"id": a.id}))
    change = ctx.run(vms.add, ctx.box, fields, vm_store.MANUAL, time.time())
    vms.log_change(change, _who(), "cli")
    ctx.print(change.vm_id)


def vm_update(ctx: AdminContext, a: argparse.Namespace) -> None:
    vm_id = vms.parse_fields({"id": a.id})["id"]
    fields = _vm_fields(a)
    change = ctx.run(vms.update, ctx.box, vm_id, fields, time.time())
    vms.log_change(change, _who(), "cli")
    ctx.print(f"VM {vm_id} updated")


def vm_remove(ctx: AdminContext, a: argparse.Namespace) -> None:
    change = ctx.run(vms.remove, vms.parse_fields({"id": a.id})["id"])
    vms.log_change(change, _who(), "cli")
    ctx.print("VM removed")


def vm_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    sources = ctx.run(vm_store.sources)
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
        )
        for v in ctx.run(store.list_vms)
    ]
    _table(
        ctx,
        ("id", "name", "owner", "state", "vnc", "password", "tls", "server_name", "source"),
        rows,
        a.json,
    )


# The most capacity a heartbeat may claim at all (cpvm.manager.web).
MAX_CAPACITY = 10**7


def _max_capacity(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_CAPACITY:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_CAPACITY}")
    return number


def _allow(items: Sequence[str] | None) -> Any:
    """``--allow`` values as networks (None: any address), or ``store.KEEP`` when absent."""
    if items is None:
        return store.KEEP
    try:
        return parse_allow(items)
    except ValueError as e:
        raise AdminError(f"--allow: {e}") from None


def create_key_file(path: str) -> int:
    """A new file for a secret: mode 0600, never an existing file, never through a
    symbolic link (``O_EXCL | O_NOFOLLOW``). Returns the open descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise AdminError(
            f"{path} already exists (or is a symbolic link): not overwritten; "
            "remove it or name a new file"
        ) from None
    except OSError as e:
        raise AdminError(f"cannot create {path}: {e.strerror}") from None
    os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask left
    return fd


def proxy_key_create(ctx: AdminContext, a: argparse.Namespace) -> None:
    proxy_id = secrets.token_hex(4)
    secret = secrets.token_urlsafe(32)
    allowed = _allow(a.allow)
    policy = ProxyPolicy(a.max_capacity, None if allowed is store.KEEP else allowed)
    # The file first: a refused --output leaves no key behind in the database.
    fd = create_key_file(a.output) if a.output else None
    try:
        ctx.run(store.create_proxy, proxy_id, a.name, sha256_hex(secret), time.time(), policy)
    except BaseException:
        if fd is not None:
            os.close(fd)
            os.unlink(a.output)
        raise
    key = f"cpvmk_{proxy_id}.{secret}"
    if fd is not None:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        ctx.print(f"proxy {a.name} id {proxy_id}; key written to {a.output}")
    else:
        ctx.print(key)


def proxy_key_update(ctx: AdminContext, a: argparse.Namespace) -> None:
    if a.max_capacity is not None and a.no_max_capacity:
        raise AdminError("give --max-capacity or --no-max-capacity, not both")
    ceiling: Any = store.KEEP
    if a.max_capacity is not None:
        ceiling = a.max_capacity
    elif a.no_max_capacity:
        ceiling = None
    allowed = _allow(a.allow)
    if ceiling is store.KEEP and allowed is store.KEEP:
        raise AdminError("nothing to change: give --max-capacity, --no-max-capacity or --allow")
    policy = ctx.run(
        lambda tx: store.set_proxy_policy(
            tx, a.name, max_capacity=ceiling, allowed_networks=allowed
        )
    )
    ctx.print(
        f"proxy key {a.name}: max capacity {_fmt_ceiling(policy)}, "
        f"allowed from {_fmt_allowed(policy)}"
    )


def _fmt_ceiling(policy: ProxyPolicy) -> str:
    return "-" if policy.max_capacity is None else str(policy.max_capacity)


def _fmt_allowed(policy: ProxyPolicy) -> str:
    if policy.allowed_networks is None:
        return "any"
    return format_networks(policy.allowed_networks) or "none"


def proxy_key_revoke(ctx: AdminContext, a: argparse.Namespace) -> None:
    ctx.run(store.revoke_proxy, a.name, time.time())
    ctx.print("proxy key revoked")


def proxy_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    now = time.time()
    timeout = ctx.config.proxies.proxy_timeout
    rows = []
    policies = ctx.run(store.proxy_policies)
    bindings = ctx.run(store.list_bindings)
    for p in ctx.run(store.list_proxies):
        if p.revoked_at is not None:
            status = "revoked"
        elif p.last_heartbeat is not None and now - p.last_heartbeat <= timeout:
            status = "up"
        else:
            status = "down"
        endpoint = (
            f"{'wss' if p.tls else 'ws'}://{p.public_host}:{p.public_port}"
            if p.public_host
            else None
        )
        policy = policies.get(p.id, ProxyPolicy())
        rows.append(
            (
                p.id,
                p.name,
                status,
                endpoint,
                p.address,
                f"{p.active_count}/{p.capacity if p.capacity is not None else '-'}",
                policy.max_capacity,
                _fmt_allowed(policy),
                p.version,
                _fmt(p.last_heartbeat),
                *_instance_cells(bindings.get(p.id)),
            )
        )
    _table(
        ctx,
        (
            "id",
            "name",
            "status",
            "endpoint",
            "address",
            "load",
            "max_capacity",
            "allow",
            "version",
            "last_heartbeat",
            *INSTANCE_COLUMNS,
        ),
        rows,
        a.json,
    )


# One running cpvm per key (cpvm/manager/instances.py): the bound instance and the last
# one refused for holding the same key.
INSTANCE_COLUMNS = (
    "instance",
    "instance_from",
    "instance_seen",
    "refused_instance",
    "refused_from",
    "refused_at",
)


def _instance_cells(b: InstanceBinding | None) -> tuple[Any, ...]:
    if b is None:
        return (None,) * len(INSTANCE_COLUMNS)
    return (
        b.instance_id,
        b.address,
        _fmt(b.seen_at) if b.seen_at else None,
        b.refused_id or ("(none sent)" if b.refused_at else None),
        b.refused_address,
        _fmt(b.refused_at) if b.refused_at else None,
    )


def session_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    filters: dict[str, Any] = {"active_only": a.active, "limit": a.limit}
    if a.vm:
        filters["vm_id"] = a.vm
    if a.account:
        filters["account_id"] = ctx.run(store.find_account, a.account).id
    records = ctx.run(lambda tx: store.list_sessions(tx, **filters))
    rows = [
        (
            r.id,
            r.account_name,
            r.vm_name,
            r.proxy_name,
            _fmt(r.created_at),
            _fmt(r.acquired_at),
            _fmt(r.ended_at),
            r.end_reason,
            r.client_address,
            r.bytes_to_client,
            r.bytes_to_server,
        )
        for r in records
    ]
    _table(
        ctx,
        (
            "id",
            "account",
            "vm",
            "proxy",
            "created",
            "acquired",
            "ended",
            "reason",
            "client",
            "bytes_to_client",
            "bytes_to_server",
        ),
        rows,
        a.json,
    )


# Parser ----------------------------------------------------------------------------------


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


def _proxy_policy_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-capacity",
        type=_max_capacity,
        metavar="N",
        help="most sessions this proxy is counted for, whatever it claims",
    )
    p.add_argument(
        "--allow",
        nargs="+",
        action="extend",
        metavar="CIDR",
        help="networks this key may be used from (TCP peer); 'any' lifts it",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpvm-manager-admin", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="manager configuration file (default /etc/cpvm/manager.conf)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    top = parser.add_subparsers(dest="group", required=True)

    account = top.add_parser("account", help="accounts").add_subparsers(dest="cmd", required=True)
    p = account.add_parser("create", help="create an account")
    p.add_argument("name")
    p.add_argument("--admin", action="store_true", help="may use every VM")
    p.set_defaults(func=account_create)
    account.add_parser("list", help="list accounts").set_defaults(func=account_list)
    p = account.add_parser("disable", help="disable an account (API keys, pending tokens)")
    p.add_argument("name", help="account name or id")
    p.set_defaults(func=account_disable)
    p = account.add_parser("enable", help="enable a disabled account")
    p.add_argument("name", help="account name or id")
    p.set_defaults(func=account_enable)

    key = top.add_parser("key", help="API keys").add_subparsers(dest="cmd", required=True)
    p = key.add_parser("create", help="new apiKey/secretKey (printed once)")
    p.add_argument("account")
    p.set_defaults(func=key_create)
    p = key.add_parser("revoke", help="revoke an API key")
    p.add_argument("apikey")
    p.set_defaults(func=key_revoke)
    key.add_parser("list", help="list API keys (never secrets)").set_defaults(func=key_list)

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

    pk = top.add_parser("proxy-key", help="console proxy keys").add_subparsers(
        dest="cmd", required=True
    )
    p = pk.add_parser("create", help="new cpvmk_<id>.<secret> key (printed once)")
    p.add_argument("--name", required=True)
    p.add_argument(
        "--output", "-o", help="write the key to this new file (mode 0600; never an existing file)"
    )
    _proxy_policy_options(p)
    p.set_defaults(func=proxy_key_create)
    p = pk.add_parser("update", help="change a proxy key's capacity ceiling or networks")
    p.add_argument("name", help="proxy name or key id")
    _proxy_policy_options(p)
    p.add_argument("--no-max-capacity", action="store_true", help="remove the ceiling")
    p.set_defaults(func=proxy_key_update)
    p = pk.add_parser("revoke", help="revoke a proxy key")
    p.add_argument("name", help="proxy name or key id")
    p.set_defaults(func=proxy_key_revoke)

    proxy = top.add_parser("proxy", help="console proxies").add_subparsers(
        dest="cmd", required=True
    )
    proxy.add_parser("list", help="list proxies and their state").set_defaults(func=proxy_list)

    session = top.add_parser("session", help="console sessions").add_subparsers(
        dest="cmd", required=True
    )
    p = session.add_parser("list", help="list console sessions")
    p.add_argument("--active", action="store_true")
    p.add_argument("--vm")
    p.add_argument("--account")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=session_list)
    return parser


def _audit_to_file(config: ManagerConfig) -> Callable[[], None]:
    """Changes made here reach the manager's audit file ([log] audit_file), as the API's
    do; returns what stops it."""
    if config.log.audit_file is None:
        return lambda: None
    try:
        stream = config.log.audit_file.open("a", encoding="utf-8")
    except OSError as e:
        raise AdminError(
            f"cannot open the audit file {config.log.audit_file}: {e.strerror}"
        ) from None
    observer = logs.audit_observer(stream)
    globalLogPublisher.addObserver(observer)

    def stop() -> None:
        globalLogPublisher.removeObserver(observer)
        stream.close()

    return stop


def _nothing() -> None:
    pass


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    out = out if out is not None else sys.stdout
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        ctx = AdminContext(config, out)
    except ConfigError as e:
        print(f"cpvm-manager-admin: configuration error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"cpvm-manager-admin: cannot open the database: {e}", file=sys.stderr)
        return 2
    stop_audit: Callable[[], None] = _nothing
    try:
        stop_audit = _audit_to_file(config)
        args.func(ctx, args)
        return 0
    except (AdminError, store.NotFound, store.Conflict, SecretKeyError, ValueError) as e:
        print(f"cpvm-manager-admin: {e}", file=sys.stderr)
        return 1
    finally:
        stop_audit()
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
