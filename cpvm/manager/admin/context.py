"""What every ``cpvm-manager-admin`` command works with: the open database and key box,
its error, and how results are printed (a table, or JSON with ``--json``)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from cpvm.manager import db as dbmodule
from cpvm.manager.config import ManagerConfig
from cpvm.manager.secrets_box import SecretBox
from cpvm.manager.signing import format_time

# The subcommands of one group (``account``, ``vm``, …), as argparse hands them out.
Commands = argparse._SubParsersAction


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


def fmt(t: float | None) -> str:
    """A time for a table cell ("-" when unset)."""
    return format_time(t) if t is not None else "-"


def table(
    ctx: AdminContext, header: Sequence[str], rows: Sequence[Sequence[Any]], as_json: bool
) -> None:
    """Print ``rows`` as aligned columns under ``header``, or as a JSON list of objects."""
    if as_json:
        ctx.print(json.dumps([dict(zip(header, r, strict=True)) for r in rows], indent=2))
        return
    cells = [list(header)] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        ctx.print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
