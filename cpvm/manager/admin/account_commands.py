"""``cpvm-manager-admin account …`` and ``key …``: accounts and their API keys (a
secret key is printed once, at creation, and never again)."""

from __future__ import annotations

import argparse
import json
import secrets
import time
import uuid

from cpvm.manager import recording_policy, store
from cpvm.manager.admin.context import AdminContext, Commands, fmt, table
from cpvm.manager.store import recordings as recording_store


def account_create(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``account create NAME [--admin]``."""
    role = "admin" if a.admin else "user"
    account = ctx.run(store.create_account, str(uuid.uuid4()), a.name, role, time.time())
    ctx.print(f"account {account.name} ({account.role}) id {account.id}")


def account_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``account list``."""
    record = ctx.run(recording_store.account_policies)
    rows = [
        (
            x.name,
            x.id,
            x.role,
            fmt(x.created_at),
            "yes" if x.disabled else "no",
            record.get(x.id, "default"),
        )
        for x in ctx.run(store.list_accounts)
    ]
    table(ctx, ("name", "id", "role", "created", "disabled", "record"), rows, a.json)


def account_update(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``account update NAME --record always|never|default``."""
    account = ctx.run(store.find_account, a.name)
    if a.record is not None:
        policy = recording_policy.stored_policy(a.record)
        ctx.run(recording_store.set_account_policy, account.id, policy)
    ctx.print(f"account {account.name} updated")


def account_disable(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``account disable NAME``."""
    account = ctx.run(store.set_account_disabled, a.name, True)
    ctx.print(f"account {account.name} disabled (its API keys and pending tokens stop working)")


def account_enable(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``account enable NAME``."""
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
    """``key create ACCOUNT``: the secret key is shown only now."""
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
    """``key revoke APIKEY``."""
    ctx.run(store.revoke_api_key, a.apikey, time.time())
    ctx.print("API key revoked")


def key_list(ctx: AdminContext, a: argparse.Namespace) -> None:
    """``key list``: never the secrets."""
    rows = [(n, k, fmt(c), fmt(r)) for n, k, c, r in ctx.run(store.list_api_keys)]
    table(ctx, ("account", "apikey", "created", "revoked"), rows, a.json)


def add_commands(top: Commands) -> None:
    """The ``account`` and ``key`` groups."""
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
    p = account.add_parser("update", help="change an account's settings")
    p.add_argument("name", help="account name or id")
    p.add_argument(
        "--record",
        choices=recording_policy.POLICY_CHOICES,
        help="record this account's console sessions: always, never, or as the default says",
    )
    p.set_defaults(func=account_update)

    key = top.add_parser("key", help="API keys").add_subparsers(dest="cmd", required=True)
    p = key.add_parser("create", help="new apiKey/secretKey (printed once)")
    p.add_argument("account")
    p.set_defaults(func=key_create)
    p = key.add_parser("revoke", help="revoke an API key")
    p.add_argument("apikey")
    p.set_defaults(func=key_revoke)
    key.add_parser("list", help="list API keys (never secrets)").set_defaults(func=key_list)
