"""``cpvm-manager-admin session list``: console sessions, live and past."""

from __future__ import annotations

import argparse
from typing import Any

from cpvm.manager import store
from cpvm.manager.admin.context import AdminContext, Commands, fmt, table


def session_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``session list [--active] [--vm ID] [--account NAME] [--limit N]``."""
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
            fmt(r.created_at),
            fmt(r.acquired_at),
            fmt(r.ended_at),
            r.end_reason,
            r.client_address,
            r.bytes_to_client,
            r.bytes_to_server,
        )
        for r in records
    ]
    table(
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


def add_commands(top: Commands) -> None:
    """The ``session`` group."""
    session = top.add_parser("session", help="console sessions").add_subparsers(
        dest="cmd", required=True
    )
    p = session.add_parser("list", help="list console sessions")
    p.add_argument("--active", action="store_true")
    p.add_argument("--vm")
    p.add_argument("--account")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=session_list)
