"""``cpvm-manager-admin proxy-key …`` and ``proxy list``: console proxy keys, their
limits, and what the proxies last reported (a key is printed or written once, at
creation)."""

from __future__ import annotations

import argparse
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

from cpvm.common.contract import MAX_CAPACITY
from cpvm.manager import store
from cpvm.manager.admin.context import AdminContext, AdminError, Commands, fmt, table
from cpvm.manager.instances import InstanceBinding
from cpvm.manager.proxy_policy import ProxyPolicy, format_networks, parse_allow
from cpvm.manager.secrets_box import sha256_hex


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
    """``proxy-key create --name NAME``: the key printed, or written to a new file, once."""
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
    """``proxy-key update NAME``: the capacity ceiling or allowed networks."""
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
    """``proxy-key revoke NAME``."""
    ctx.run(store.revoke_proxy, a.name, time.time())
    ctx.print("proxy key revoked")


def proxy_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``proxy list``: each key's state, load, limits and bound instance."""
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
                fmt(p.last_heartbeat),
                *_instance_cells(bindings.get(p.id)),
            )
        )
    table(
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
        fmt(b.seen_at) if b.seen_at else None,
        b.refused_id or ("(none sent)" if b.refused_at else None),
        b.refused_address,
        fmt(b.refused_at) if b.refused_at else None,
    )


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


def add_commands(top: Commands) -> None:
    """The ``proxy-key`` and ``proxy`` groups."""
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
