"""Database access for the service: ``adbapi`` pools over the plain connections of
:mod:`cpvm.manager.connections`, and the one namespace its callers use (``db.Tx``,
``db.run_sync``, ``db.migrate``, …).

* SQLite (default): one writing connection (``cp_max=1``), WAL, every transaction ``BEGIN
  IMMEDIATE`` so a redemption's check-then-update can't interleave with another process.
* PostgreSQL: psycopg2, a pool of connections; single-use is guaranteed by a conditional
  ``UPDATE … WHERE acquired_at IS NULL`` (row lock + re-check under READ COMMITTED).

Read-only queries (API caller lookups, listConsoleSessions, proxy key checks, readiness)
go through :meth:`Database.read`: a second pool of read-only connections, so they neither
take SQLite's write lock nor wait for a pool connection held by a writer (a write blocked
on a lock, a flood of redemptions).

The schema and its migrations are :mod:`cpvm.manager.migrations`; keeping tokens one-time
across a power cut is :mod:`cpvm.manager.sqlite_recovery`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.enterprise import adbapi

from cpvm.manager.config import DatabaseConfig
from cpvm.manager.connections import (
    SYNC_FULL,
    SYNC_NORMAL,
    Tx,
    connect_sync,
    ensure_sqlite_dir,
    pg_read_setup,
    run_sync,
    sqlite_read_setup,
    sqlite_setup,
)
from cpvm.manager.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from cpvm.manager.sqlite_recovery import CLEAN_STOP_SUFFIX, mark_clean_stop, recover_sqlite

__all__ = [
    "CLEAN_STOP_SUFFIX",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLITE_READERS",
    "Database",
    "Tx",
    "connect_sync",
    "migrate",
    "read_pool_size",
    "recover_sqlite",
    "run_sync",
]

T = TypeVar("T")

# Read-only SQLite connections per manager (WAL readers run side by side with the writer).
SQLITE_READERS = 4


def read_pool_size(pool_size: int) -> int:
    """PostgreSQL read-only connections next to ``pool_size`` writing ones."""
    return max(2, pool_size // 2)


class Database:
    """Non-blocking access for the service: interactions run in adbapi's thread pool."""

    def __init__(self, config: DatabaseConfig, reactor: Any):
        self.kind = config.kind
        self.path = config.path
        if config.kind == "sqlite":
            assert config.path is not None
            ensure_sqlite_dir(config.path)
            self.pool = adbapi.ConnectionPool(
                "sqlite3",
                config.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=10,
                cp_min=1,
                cp_max=1,
                cp_openfun=sqlite_setup,
                cp_reactor=reactor,
            )
            self.read_pool = adbapi.ConnectionPool(
                "sqlite3",
                config.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=10,
                cp_min=1,
                cp_max=SQLITE_READERS,
                cp_openfun=sqlite_read_setup,
                cp_reactor=reactor,
            )
        else:
            self.pool = adbapi.ConnectionPool(
                "psycopg2",
                config.dsn,
                cp_min=1,
                cp_max=config.pool_size,
                cp_reconnect=True,
                cp_reactor=reactor,
            )
            self.read_pool = adbapi.ConnectionPool(
                "psycopg2",
                config.dsn,
                cp_min=1,
                cp_max=read_pool_size(config.pool_size),
                cp_reconnect=True,
                cp_openfun=pg_read_setup,
                cp_reactor=reactor,
            )

    def run(self, fn: Callable[..., T], *args: Any, durable: bool = True) -> Any:
        """Deferred firing with ``fn(tx, *args)``, run in one transaction off the reactor.

        ``durable=False`` (SQLite only) commits without waiting for the disk (WAL with
        ``synchronous=NORMAL``): the transaction survives a crash of the manager process but
        may be lost, whole, on a power cut or kernel crash — for writes that are repeated
        anyway (heartbeats) and for redemptions, whose loss ``recover_sqlite`` makes safe
        at the next start. Everything else commits with ``synchronous=FULL``: on disk
        before the answer leaves.
        """
        kind = self.kind

        def interaction(cursor: Any) -> T:
            tx = Tx(cursor, kind)
            if kind == "sqlite":
                # A per-connection setting, read at commit: set it for this transaction.
                cursor.execute(SYNC_FULL if durable else SYNC_NORMAL)
            tx.begin()
            return fn(tx, *args)

        return self.pool.runInteraction(interaction)

    def read(self, fn: Callable[..., T], *args: Any) -> Any:
        """Deferred firing with ``fn(tx, *args)`` in a read-only transaction on the read
        pool: SQLite ``BEGIN`` (deferred: a WAL snapshot, never the write lock),
        PostgreSQL ``READ ONLY``. ``fn`` must not write (the connection refuses it)."""
        kind = self.kind

        def interaction(cursor: Any) -> T:
            tx = Tx(cursor, kind)
            if kind == "sqlite":
                cursor.execute("BEGIN")
            return fn(tx, *args)

        return self.read_pool.runInteraction(interaction)

    def ping(self) -> Any:
        return self.read_pool.runQuery("SELECT 1")

    def close(self) -> None:
        self.pool.close()
        self.read_pool.close()

    def mark_clean_stop(self) -> bool:
        """After ``close``, from the manager's own stop only (SQLite): leave the marker that
        spares pending tokens at the next start (see ``recover_sqlite``). True if written."""
        if self.kind != "sqlite" or self.path is None:
            return False
        try:
            return mark_clean_stop(self.path)
        except (OSError, sqlite3.Error):
            return False  # the next start voids pending tokens: safe, only less kind
