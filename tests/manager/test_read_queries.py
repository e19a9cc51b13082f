"""Read-only API queries do not wait for writers (security issue, finding 5): a real
``twistd cpvm-manager`` answers listConsoleSessions and /readyz while the database's write
lock (SQLite) or every writing connection (PostgreSQL) is held."""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time

import psycopg2
import pytest
import pytest_twisted

from tests.manager.real_manager import ManagerDaemon

_names = itertools.count()


@pytest.fixture
def start_manager(tmp_path):
    started: list[ManagerDaemon] = []

    def start(name: str, sections: dict | None = None) -> ManagerDaemon:
        manager = ManagerDaemon(tmp_path / name, sections)
        started.append(manager)
        return manager

    yield start
    for manager in started:
        manager.stop()


def _token(m: ManagerDaemon, creds, vm: str) -> str:
    status, body = m.api(creds, "createConsoleEndpoint", virtualmachineid=vm)
    assert status == 200, body
    return body["createconsoleendpointresponse"]["consoleendpoint"]["websocket"]["token"]


def _reads_answer(m: ManagerDaemon, creds) -> None:
    # Bounded: on a manager whose reads queue behind the writer these time out or fail.
    status, body = m.api(creds, "listConsoleSessions")
    assert status == 200, body
    assert body["listconsolesessionsresponse"]["count"] >= 1
    status, text, _ = m.request("/readyz", timeout=20)
    assert (status, text) == (200, "ready\n")


def test_sqlite_reads_proceed_while_the_write_lock_is_held(start_manager):
    m = start_manager("sqlite")
    alice = m.account("alice")
    vm = m.vm("alice")
    m.heartbeat(m.proxy_key())
    _token(m, alice, vm)
    # Another process holds SQLite's write lock (cpvm-manager-admin, a long cleanup).
    writer = sqlite3.connect(m.directory / "data" / "manager.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        _reads_answer(m, alice)
    finally:
        writer.rollback()
        writer.close()
    _token(m, alice, vm)  # writes go on once the lock is released


def _redeem(m: ManagerDaemon, key: str, token: str, results: list) -> None:
    body = {"token": token, "extra": None, "client_address": "127.0.0.1"}
    status, _, _ = m.request(
        "/proxy/v1/redeem",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        timeout=60,
    )
    results.append(status)


def _waiting_on_locks(dsn: str, database: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (database,),
        )
        return int(cur.fetchone()[0])
    finally:
        conn.close()


def test_postgres_reads_proceed_while_every_writer_waits(start_manager, postgres):
    database = f"reads_{next(_names)}_{int(time.time()) % 100000}"
    dsn = postgres.create_database(database)
    m = start_manager(
        "pg",
        {
            "database": {
                "url": f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{database}",
                "pool_size": "2",
            }
        },
    )
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key()
    m.heartbeat(key)
    token = _token(m, alice, vm)
    locker = psycopg2.connect(dsn)
    results: list[int] = []
    threads = [threading.Thread(target=_redeem, args=(m, key, token, results)) for _ in range(4)]
    try:
        # Lock the session's row: every redemption of its token waits on it, holding both
        # writing connections of the pool.
        locker.cursor().execute(
            "UPDATE console_sessions SET client_address = client_address "
            "WHERE token_hash IS NOT NULL"
        )
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _waiting_on_locks(dsn, database) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _waiting_on_locks(dsn, database) == 2  # the whole write pool is stuck
        _reads_answer(m, alice)
    finally:
        locker.rollback()
        locker.close()
        for t in threads:
            t.join(60)
    assert sorted(results) == [200, 409, 409, 409]


def _write_through_reader(tx):
    tx.execute("UPDATE accounts SET disabled = 1")


@pytest_twisted.ensureDeferred
async def test_the_read_pool_refuses_writes(managers, postgres):
    database = f"ro_{next(_names)}_{int(time.time()) % 100000}"
    postgres.create_database(database)
    pg = {
        "database": {
            "url": f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{database}"
        }
    }
    for name, sections in (("sqlite", None), ("pg", pg)):
        m = await managers(name, sections)
        m.account("alice")
        db = m.service.database
        with pytest.raises(Exception, match="(?i)read-only|readonly"):
            await db.read(_write_through_reader)
        rows = await db.read(lambda tx: tx.execute("SELECT disabled FROM accounts").fetchall())
        assert rows == [(0,)]
