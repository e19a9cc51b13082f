"""The manager on a real PostgreSQL, alone and as two services sharing one database."""

from __future__ import annotations

import itertools

import psycopg2
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

_names = itertools.count()


def _pg_sections(postgres, shared_key):
    name = f"mgr_{next(_names)}_{id(shared_key) % 100000}"
    dsn = postgres.create_database(name)
    url = f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{name}"
    return dsn, {
        "database": {"url": url, "pool_size": "8"},
        "security": {"secret_key_file": str(shared_key)},
    }


@pytest_twisted.ensureDeferred
async def test_two_managers_one_postgres(managers, postgres, tmp_path, log_events):
    dsn, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    alice = m1.account("alice")
    vm = m1.vm("alice", password="pg-vnc-password-77")
    key = m1.proxy_key("p1")
    await m2.heartbeat(key)
    # one manager alone, then both: tokens created on either, redemptions spread over both
    for creator, redeemers in ((m1, [m1]), (m1, [m1, m2]), (m2, [m1, m2])):
        tokens = [
            (await creator.endpoint(alice, vm, token="ex-tra"))["websocket"]["token"]
            for _ in range(3)
        ]
        for token in tokens:
            results = await gatherResults(
                [
                    Deferred.fromCoroutine(
                        redeemers[i % len(redeemers)].redeem(key, token, "ex-tra")
                    )
                    for i in range(50)
                ]
            )
            statuses = sorted(s for s, _ in results)
            assert statuses == [200] + [409] * 49
            winner = next(b for s, b in results if s == 200)
            assert winner["vnc"]["password"] == "pg-vnc-password-77"

    # nothing secret in any row
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        dump = ""
        for (table,) in cur.fetchall():
            cur.execute(f"SELECT * FROM {table}")
            dump += repr(cur.fetchall())
    finally:
        conn.close()
    assert "schema_version" in repr(dump) or dump
    for secret in m1.secrets_seen + m2.secrets_seen:
        assert secret not in dump
        assert secret.lower() not in dump.lower()
    logged = repr([e for e in log_events])
    for secret in m1.secrets_seen + m2.secrets_seen:
        assert secret not in logged
