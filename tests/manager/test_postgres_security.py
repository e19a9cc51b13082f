"""Security fixes on PostgreSQL: ``endConsoleSession`` racing a redemption (READ
COMMITTED), and the proxy key limits of migration 4.

The manager reads the session (not yet redeemed), then writes its end; a redemption that
commits in between must not be overwritten: the live session is asked to terminate
instead, at its proxy's next heartbeat.
"""

from __future__ import annotations

import time

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from cpvm.manager import store
from cpvm.manager.db import Tx
from tests.manager.test_postgres import _pg_sections
from tests.manager.test_proxy_keys import OUTSIDER, beat, proxies, proxy_from


def _waiting_on_a_lock(dsn: str, database: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (database,),
        )
        return cur.fetchone()[0]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_end_request_racing_a_redemption_terminates_the_live_session(
    managers, postgres, tmp_path
):
    dsn, sections = _pg_sections(postgres, tmp_path / "kek")
    database = sections["database"]["url"].rsplit("/", 1)[1]
    m = await managers("a", sections)
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    await m.endpoint(alice, vm)
    status, body = await m.api(alice, "listConsoleSessions")
    (session,) = body["listconsolesessionsresponse"]["consolesession"]
    session_id = session["id"]

    # A redemption in flight: the manager's own conditional UPDATE, not yet committed.
    redeemer = psycopg2.connect(dsn)
    try:
        assert store.mark_acquired(
            Tx(redeemer.cursor(), "postgresql"), session_id, "203.0.113.7", time.time(), 0
        )
        ending = Deferred.fromCoroutine(m.api(alice, "endConsoleSession", id=session_id))
        # The manager has read "not redeemed" and now waits for the row: commit.
        deadline = time.monotonic() + 15
        while not _waiting_on_a_lock(dsn, database):
            assert time.monotonic() < deadline, "endConsoleSession never reached the row lock"
            await deferLater(reactor, 0.05)
        redeemer.commit()
    finally:
        redeemer.close()
    status, body = await ending
    assert (status, body) == (200, {"endconsolesessionresponse": {"success": True}})

    status, body = await m.api(alice, "listConsoleSessions", id=session_id)
    (record,) = body["listconsolesessionsresponse"]["consolesession"]
    assert "ended" not in record and "acquired" in record and "terminaterequested" in record
    # The proxy that redeemed it is told to end it.
    answer = await m.heartbeat(key, active=[session_id])
    assert answer["terminate"] == [session_id]


@pytest_twisted.ensureDeferred
async def test_proxy_key_limits_on_postgresql(managers, postgres, tmp_path):
    """Migration 4 on PostgreSQL: the limits are stored, listed and enforced there too."""
    _, sections = _pg_sections(postgres, tmp_path / "kek")
    m = await managers("a", sections)
    key = m.admin(
        "proxy-key", "create", "--name", "p1", "--max-capacity", "3", "--allow", "127.0.0.1/32"
    ).strip()
    m.secrets_seen.append(key)
    status, body = await proxy_from(m, OUTSIDER, key, "heartbeat", beat("evil.example", 10**7))
    assert (status, body["error"]) == (403, "source_not_allowed")
    status, _ = await proxy_from(m, "127.0.0.1", key, "heartbeat", beat(capacity=10**7))
    assert status == 200
    listed = proxies(m)["p1"]
    assert (listed["max_capacity"], listed["allow"], listed["load"]) == (3, "127.0.0.1/32", "0/3")
    m.admin("proxy-key", "update", "p1", "--max-capacity", "1", "--allow", "any")
    listed = proxies(m)["p1"]
    assert (listed["max_capacity"], listed["allow"], listed["load"]) == (1, "any", "0/1")
