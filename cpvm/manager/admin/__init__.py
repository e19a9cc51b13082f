"""``cpvm-manager-admin``: accounts, API keys, VMs and proxy keys, straight in the database.

It uses the manager's configuration file, schema migrations and queries, synchronously.
Secrets are printed once, at creation, and never again; VNC passwords are read from a file
or stdin, never from the command line.

The commands live in one module per subject (``account_commands``, ``vm_commands``,
``proxy_commands``, ``session_commands``), each adding its own groups to the parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from twisted.logger import globalLogPublisher

from cpvm.common import logs
from cpvm.common.inifile import ConfigError
from cpvm.manager import store
from cpvm.manager.admin import account_commands, proxy_commands, session_commands, vm_commands
from cpvm.manager.admin.account_commands import command_line_safe_key
from cpvm.manager.admin.context import AdminContext, AdminError
from cpvm.manager.admin.proxy_commands import INSTANCE_COLUMNS, MAX_CAPACITY, create_key_file
from cpvm.manager.config import ManagerConfig, load_config
from cpvm.manager.secrets_box import SecretKeyError

__all__ = [
    "INSTANCE_COLUMNS",
    "MAX_CAPACITY",
    "AdminContext",
    "AdminError",
    "build_parser",
    "command_line_safe_key",
    "create_key_file",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the global options, then each subject's groups."""
    parser = argparse.ArgumentParser(prog="cpvm-manager-admin", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config",
        "-c",
        default=None,
        help="manager configuration file (default /etc/cpvm/manager.conf)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    top = parser.add_subparsers(dest="group", required=True)
    for subject in (account_commands, vm_commands, proxy_commands, session_commands):
        subject.add_commands(top)
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
