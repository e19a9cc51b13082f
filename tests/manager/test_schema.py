"""The schema's migrations, and the indexes the hot queries rely on: SQLite's plan of the
SQL the store really sends (recorded at the cursor, not copied here)."""

from __future__ import annotations

import time
from typing import Any

from cpvm.manager import db, store
from cpvm.manager.config import DatabaseConfig


def test_migrations_reach_the_latest_version_once(tmp_path):
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    assert db.migrate(config, time.time()) == [v for v, _ in db.MIGRATIONS]
    assert db.migrate(config, time.time()) == []
    conn = db.connect_sync(config)
    try:
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        assert version == db.SCHEMA_VERSION
    finally:
        conn.close()


class RecordingCursor:
    """A DB-API cursor that remembers every statement it runs, with its parameters."""

    def __init__(self, cursor: Any):
        self._cursor = cursor
        self.statements: list[tuple[str, tuple]] = []

    def execute(self, sql: str, params: tuple = ()) -> Any:
        self.statements.append((sql, tuple(params)))
        return self._cursor.execute(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def run_recorded(conn: Any, fn: Any, *args: Any) -> list[tuple[str, tuple]]:
    """Run ``fn(tx, *args)`` as the store runs it; the SQL it sent to SQLite."""
    cursor = RecordingCursor(conn.cursor())
    fn(db.Tx(cursor, "sqlite"), *args)
    return cursor.statements


def plan(conn: Any, sql: str, params: tuple) -> str:
    return " / ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


BEAT = {
    "public_host": "cpvm.example.com",
    "public_port": 8443,
    "tls": True,
    "address": None,
    "capacity": 10,
    "active_count": 0,
    "version": "t",
}


def test_per_token_and_per_beat_queries_search_an_index(tmp_path):
    # Choosing a proxy for every new token (live_proxies) and every heartbeat count open
    # sessions: a scan would grow with every session kept for retention_days.
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    now = time.time()
    db.migrate(config, now)
    conn = db.connect_sync(config)
    try:
        db.run_sync(conn, "sqlite", store.create_proxy, "p1", "cpvm-1", "hash", now)
        ran = run_recorded(conn, store.heartbeat, "p1", BEAT, now)
        ran += run_recorded(conn, store.live_proxies, now, 20.0, "vm-1")
        plans = {sql: plan(conn, sql, params) for sql, params in ran if "console_sessions" in sql}
        # The proxy is live, so every count ran: the proxy's, the pending and live
        # sessions, the VM's.
        assert len(plans) == 4, list(plans)
        for sql, p in plans.items():
            assert "SCAN console_sessions" not in p and "USING" in p, (sql, p)
        # The counts of open sessions across proxies use the index on ended_at.
        assert sum("console_sessions_ended" in p for p in plans.values()) >= 2, plans
    finally:
        conn.close()


def test_per_redemption_queries_search_an_index(tmp_path):
    # Every redemption looks its token up by hash and wins it with one conditional write;
    # every end report reads and writes the session by id: none may scan the sessions
    # (or the VMs and accounts the token's lookup joins).
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    now = time.time()
    db.migrate(config, now)
    conn = db.connect_sync(config)
    try:
        db.run_sync(conn, "sqlite", store.create_account, "a1", "alice", "user", now)
        vm = {"id": "vm-1", "name": "v", "owner_id": "a1", "state": "Running"}
        vm |= {"vnc_host": "h", "vnc_port": 5900, "vnc_tls": "none"}
        db.run_sync(conn, "sqlite", store.add_vm, vm, now)
        db.run_sync(conn, "sqlite", store.create_proxy, "p1", "cpvm-1", "hash", now)
        session = {"id": "s1", "token_hash": "th", "extra_hash": None, "expires_at": now + 60}
        session |= {"created_at": now, "account_id": "a1", "account_name": "alice"}
        session |= {"vm_id": "vm-1", "vm_name": "v", "proxy_id": "p1"}
        session |= {"creator_address": None, "bound_address": None}
        db.run_sync(conn, "sqlite", store.insert_session, session)
        report = {"reason": "closed", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1}
        lookup = run_recorded(conn, store.token_row, "th")
        ran = lookup + run_recorded(conn, store.mark_acquired, "s1", "127.0.0.1", now)
        ran += run_recorded(conn, store.end_session, "s1", "p1", report, now)
        assert db.run_sync(conn, "sqlite", store.get_session, "s1").end_reason == "closed"
        plans = {sql: plan(conn, sql, params) for sql, params in ran}
        # The lookup, the win, then the end report's read, write and (the same) read back.
        assert len(ran) == 5 and len(plans) == 4, list(plans)
        for sql, p in plans.items():
            assert "SCAN" not in p and "USING" in p, (sql, p)
        ((token_sql, _),) = lookup
        assert "(token_hash=?)" in plans[token_sql], plans[token_sql]
    finally:
        conn.close()
