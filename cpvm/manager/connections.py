"""Transactions on plain DB-API connections, shared by the service's pools
(:mod:`cpvm.manager.db`), the admin CLI and start-up (migrations, SQLite recovery).

SQLite connections run in WAL mode with every transaction ``BEGIN IMMEDIATE``, so a
redemption's check-then-update can't interleave with another process; PostgreSQL ones go
through psycopg2. SQL is written with ``?`` placeholders; :class:`Tx` rewrites them for
psycopg2.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cpvm.manager.config import DatabaseConfig

T = TypeVar("T")


class Tx:
    """A cursor in one transaction, hiding the placeholder style of the back-end."""

    def __init__(self, cursor: Any, kind: str):
        self._cursor = cursor
        self.kind = kind

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "Tx":
        if self.kind == "postgresql":
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, tuple(params))
        return self

    def fetchone(self) -> tuple | None:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        return list(self._cursor.fetchall())

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    def begin(self) -> None:
        """Start the transaction (SQLite: take the write lock now, not at the first write)."""
        if self.kind == "sqlite":
            self._cursor.execute("BEGIN IMMEDIATE")


def sqlite_connect(path: str) -> sqlite3.Connection:
    """A SQLite connection in autocommit mode (transactions are explicit), set up."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    sqlite_setup(conn)
    return conn


SYNC_FULL = "PRAGMA synchronous=FULL"
SYNC_NORMAL = "PRAGMA synchronous=NORMAL"


def sqlite_setup(conn: sqlite3.Connection) -> None:
    """Every SQLite connection: WAL, durable commits, a busy timeout, foreign keys."""
    conn.execute("PRAGMA journal_mode=WAL")
    # Every commit reaches the disk before it returns, unless ``Database.run(durable=False)``
    # relaxes it for one transaction.
    conn.execute(SYNC_FULL)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")


def sqlite_read_setup(conn: sqlite3.Connection) -> None:
    """A SQLite connection of the read pool: set up, and refusing writes."""
    sqlite_setup(conn)
    # A bug that writes through a reader fails instead of taking the write lock.
    conn.execute("PRAGMA query_only=ON")


def pg_read_setup(conn: Any) -> None:
    """A PostgreSQL connection of the read pool: read-only sessions."""
    conn.set_session(readonly=True)


def ensure_sqlite_dir(path: str) -> None:
    """Create the database file's directory (mode 0750) if it is missing."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o750, exist_ok=True)


def connect_sync(config: DatabaseConfig) -> Any:
    """A plain DB-API connection (admin CLI, start-up migrations)."""
    if config.kind == "sqlite":
        assert config.path is not None
        ensure_sqlite_dir(config.path)
        return sqlite_connect(config.path)
    import psycopg2

    return psycopg2.connect(config.dsn)


def run_sync(conn: Any, kind: str, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(tx, *args)`` in one transaction on a plain connection."""
    cursor = conn.cursor()
    tx = Tx(cursor, kind)
    try:
        tx.begin()
        result = fn(tx, *args)
        conn.commit()
        return result
    except BaseException:
        conn.rollback()
        raise
    finally:
        cursor.close()
