"""Database access shared by the service (through adbapi) and the admin CLI (directly).

One schema, numbered migrations recorded in ``schema_version``, two back-ends:

* SQLite (default): one connection (``cp_max=1``), WAL, every transaction ``BEGIN
  IMMEDIATE`` so a redemption's check-then-update can't interleave with another process.
* PostgreSQL: psycopg2, a pool of connections; single-use is guaranteed by a conditional
  ``UPDATE … WHERE acquired_at IS NULL`` (row lock + re-check under READ COMMITTED).

Read-only queries (API caller lookups, listConsoleSessions, proxy key checks, readiness)
go through :meth:`Database.read`: a second pool of read-only connections, so they neither
take SQLite's write lock nor wait for a pool connection held by a writer (a write blocked
on a lock, a flood of redemptions).

SQL is written with ``?`` placeholders; :class:`Tx` rewrites them for psycopg2.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.enterprise import adbapi

from cpvm.manager.config import DatabaseConfig

T = TypeVar("T")

# Key for pg_advisory_xact_lock: serialises migrations of several managers starting at once.
_MIGRATION_LOCK = 0x63707677

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE accounts (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL REFERENCES accounts(id),
                api_key TEXT NOT NULL UNIQUE,
                secret_enc TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            """CREATE TABLE vms (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                owner_id TEXT NOT NULL REFERENCES accounts(id),
                state TEXT NOT NULL,
                vnc_host TEXT NOT NULL,
                vnc_port INTEGER NOT NULL,
                vnc_password_enc TEXT,
                vnc_tls TEXT NOT NULL,
                vnc_ca_pem TEXT,
                vnc_server_name TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE proxies (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                secret_hash TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                public_host TEXT,
                public_port INTEGER,
                tls INTEGER,
                address TEXT,
                capacity INTEGER,
                active_count INTEGER NOT NULL DEFAULT 0,
                version TEXT,
                last_heartbeat DOUBLE PRECISION
            )""",
            """CREATE TABLE console_sessions (
                id TEXT PRIMARY KEY,
                token_hash TEXT UNIQUE,
                extra_hash TEXT,
                expires_at DOUBLE PRECISION NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                account_id TEXT NOT NULL,
                account_name TEXT NOT NULL,
                vm_id TEXT NOT NULL,
                vm_name TEXT NOT NULL,
                proxy_id TEXT NOT NULL,
                creator_address TEXT,
                bound_address TEXT,
                acquired_at DOUBLE PRECISION,
                client_address TEXT,
                ended_at DOUBLE PRECISION,
                end_reason TEXT,
                bytes_to_client BIGINT,
                bytes_to_server BIGINT,
                duration DOUBLE PRECISION,
                terminate_requested_at DOUBLE PRECISION
            )""",
            "CREATE INDEX console_sessions_proxy ON console_sessions (proxy_id, ended_at)",
            "CREATE INDEX console_sessions_vm ON console_sessions (vm_id, ended_at)",
            "CREATE INDEX console_sessions_created ON console_sessions (created_at)",
        ],
    ),
    (
        2,
        [
            # Which worker process of the proxy redeemed the session: its heartbeats list
            # the sessions it still has, so the others can be ended (crash, restart).
            "ALTER TABLE console_sessions ADD COLUMN worker INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        3,
        [
            # Choosing a proxy for each new token counts the open sessions (ended_at IS
            # NULL): with this index a few rows, not the whole retained history (20 ms per
            # token at 200,000 records before, 0.1 ms after); the retention cleanup's range
            # on ended_at uses it too.
            "CREATE INDEX console_sessions_ended ON console_sessions (ended_at)",
        ],
    ),
    (
        4,
        [
            # Per proxy key, set by the administrator (cpvm-manager-admin proxy-key
            # create|update): the most capacity a heartbeat may claim, and the networks
            # its calls may come from (canonical CIDRs, space-separated). NULL: no limit.
            "ALTER TABLE proxies ADD COLUMN max_capacity INTEGER",
            "ALTER TABLE proxies ADD COLUMN allowed_networks TEXT",
        ],
    ),
    (
        5,
        [
            # One running cpvm instance per proxy key (cpvm/manager/instances.py): the
            # instance the key is bound to, when it was last heard from and from where,
            # and the last instance refused for holding the same key.
            "ALTER TABLE proxies ADD COLUMN instance_id TEXT",
            "ALTER TABLE proxies ADD COLUMN instance_seen_at DOUBLE PRECISION",
            "ALTER TABLE proxies ADD COLUMN instance_address TEXT",
            "ALTER TABLE proxies ADD COLUMN refused_instance_id TEXT",
            "ALTER TABLE proxies ADD COLUMN refused_at DOUBLE PRECISION",
            "ALTER TABLE proxies ADD COLUMN refused_address TEXT",
        ],
    ),
    (
        6,
        [
            # Where each VM comes from: 'manual' (cpvm-manager-admin), 'api'
            # (addConsoleVirtualMachine) or 'libvirt:NAME' ([inventory.libvirt.NAME]);
            # discovery only ever touches its own. hostname / hypervisor: what
            # listVirtualMachines shows (the libvirt host, "KVM"), NULL when unknown.
            "ALTER TABLE vms ADD COLUMN source TEXT NOT NULL DEFAULT 'manual'",
            "ALTER TABLE vms ADD COLUMN hostname TEXT",
            "ALTER TABLE vms ADD COLUMN hypervisor TEXT",
            "CREATE INDEX vms_source ON vms (source)",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


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


def _sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    _sqlite_setup(conn)
    return conn


_SYNC_FULL = "PRAGMA synchronous=FULL"
_SYNC_NORMAL = "PRAGMA synchronous=NORMAL"


def _sqlite_setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    # Every commit reaches the disk before it returns, unless ``Database.run(durable=False)``
    # relaxes it for one transaction.
    conn.execute(_SYNC_FULL)
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=ON")


def _sqlite_read_setup(conn: sqlite3.Connection) -> None:
    _sqlite_setup(conn)
    # A bug that writes through a reader fails instead of taking the write lock.
    conn.execute("PRAGMA query_only=ON")


def _pg_read_setup(conn: Any) -> None:
    conn.set_session(readonly=True)


# Read-only SQLite connections per manager (WAL readers run side by side with the writer).
SQLITE_READERS = 4


def _ensure_sqlite_dir(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o750, exist_ok=True)


def connect_sync(config: DatabaseConfig) -> Any:
    """A plain DB-API connection (admin CLI, start-up migrations)."""
    if config.kind == "sqlite":
        assert config.path is not None
        _ensure_sqlite_dir(config.path)
        return _sqlite_connect(config.path)
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


CLEAN_STOP_SUFFIX = ".clean-stop"


def recover_sqlite(config: DatabaseConfig, now: float) -> int | None:
    """Start-up, before anything is served (SQLite only): keep tokens one-time across a
    power cut.

    Redemptions commit without waiting for the disk (``Database.run(durable=False)``): a
    manager crash loses nothing, but a power cut or kernel crash can forget the last ones,
    and a forgotten redemption would let its token be redeemed again. So unless the
    previous run left its clean-stop marker (written by ``Database.close`` once everything
    was on disk), every token not yet redeemed is voided here, durably. Returns the number
    voided, or None after a clean stop.
    """
    assert config.kind == "sqlite" and config.path is not None
    marker = config.path + CLEAN_STOP_SUFFIX
    if os.path.exists(marker):
        # Gone, durably, before the first redemption: a crash from now on must sweep.
        os.unlink(marker)
        _fsync_dir(marker)
        return None
    conn = connect_sync(config)
    try:
        return run_sync(conn, "sqlite", _void_unredeemed, now)
    finally:
        conn.close()


def _void_unredeemed(tx: Tx, now: float) -> int:
    tx.execute(
        "UPDATE console_sessions SET ended_at = ?, end_reason = 'voided', token_hash = NULL, "
        "extra_hash = NULL WHERE acquired_at IS NULL AND ended_at IS NULL",
        (now,),
    )
    return tx.rowcount


def _mark_clean_stop(path: str) -> bool:
    """After the pool closed: everything committed goes into the database file, on disk;
    then the marker says so. False (no marker) if the checkpoint could not complete."""
    conn = _sqlite_connect(path)
    try:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy or frames != done:
        return False
    marker = path + CLEAN_STOP_SUFFIX
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(marker)
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_version(tx: Tx) -> int:
    row = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _migrate(tx: Tx, now: float) -> list[int]:
    if tx.kind == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    current = _current_version(tx)
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {current} is newer than this manager ({SCHEMA_VERSION})"
        )
    applied = []
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            tx.execute(statement)
        tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now))
        applied.append(version)
    return applied


def migrate(config: DatabaseConfig, now: float) -> list[int]:
    """Bring the schema up to date; returns the versions applied. Safe to run concurrently."""
    conn = connect_sync(config)
    try:
        return run_sync(conn, config.kind, _migrate, now)
    finally:
        conn.close()


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
            _ensure_sqlite_dir(config.path)
            self.pool = adbapi.ConnectionPool(
                "sqlite3",
                config.path,
                check_same_thread=False,
                isolation_level=None,
                timeout=10,
                cp_min=1,
                cp_max=1,
                cp_openfun=_sqlite_setup,
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
                cp_openfun=_sqlite_read_setup,
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
                cp_openfun=_pg_read_setup,
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
                cursor.execute(_SYNC_FULL if durable else _SYNC_NORMAL)
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
            return _mark_clean_stop(self.path)
        except (OSError, sqlite3.Error):
            return False  # the next start voids pending tokens: safe, only less kind
