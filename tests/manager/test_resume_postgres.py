"""The reconnect window with two managers on one PostgreSQL: of many redemptions that
all may resume a lost session, exactly one does; a resume racing another holds."""

from __future__ import annotations

import hashlib
import time

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater

from cpvm.manager import resume_store
from cpvm.manager.db import Tx
from tests.manager.test_postgres import _pg_sections
from tests.manager.test_postgres_security import _waiting_on_a_lock

BROWSER = hashlib.sha256(b"one browser's console cookie").hexdigest()
LOST = {"reason": "client_lost", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1}


async def _lost_session(managers, postgres, tmp_path):
    dsn, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    alice = m1.account("alice")
    vm = m1.vm("alice")
    key = m1.proxy_key("p1")
    await m1.heartbeat(key)
    token = (await m1.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m1.proxy(
        key, "redeem", {"token": token, "client_address": "127.0.0.1", "browser_hash": BROWSER}
    )
    assert status == 200, body
    sid = body["session_id"]
    status, _ = await m2.proxy(key, f"sessions/{sid}/end", LOST)
    assert status == 204
    return dsn, sections, (m1, m2), alice, key, token, sid


def _resume(m, key, token):
    body = {"token": token, "client_address": "127.0.0.1", "browser_hash": BROWSER}
    return Deferred.fromCoroutine(m.proxy(key, "redeem", body))


@pytest_twisted.ensureDeferred
async def test_of_many_concurrent_resumes_on_two_managers_exactly_one_wins(
    managers, postgres, tmp_path
):
    _, _, ms, alice, key, token, sid = await _lost_session(managers, postgres, tmp_path)
    results = await gatherResults([_resume(ms[i % 2], key, token) for i in range(40)])
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] + [409] * 39
    winner = next(body for status, body in results if status == 200)
    assert winner["session_id"] == sid and winner["reconnects"] == 1
    status, body = await ms[1].api(alice, "listConsoleSessions", id=sid)
    (record,) = body["listconsolesessionsresponse"]["consolesession"]
    assert record["reconnects"] == 1 and "ended" not in record


@pytest_twisted.ensureDeferred
async def test_a_resume_waiting_on_another_ones_row_is_refused_when_that_one_commits(
    managers, postgres, tmp_path
):
    dsn, sections, ms, alice, key, token, sid = await _lost_session(managers, postgres, tmp_path)
    database = sections["database"]["url"].rsplit("/", 1)[1]
    # Another manager's resume, in flight: its conditional UPDATE done, not committed.
    other = psycopg2.connect(dsn)
    try:
        tx = Tx(other.cursor(), "postgresql")
        facts = resume_store.resume_facts(tx, sid)
        assert facts is not None and facts.reconnects == 0
        assert resume_store.resume_session(tx, sid, facts, "127.0.0.1", 0, time.time()) == 1
        racing = _resume(ms[0], key, token)
        deadline = time.monotonic() + 15
        while not _waiting_on_a_lock(dsn, database):
            assert time.monotonic() < deadline, "the manager's resume never reached the row lock"
            await deferLater(reactor, 0.05)
        other.commit()
    finally:
        other.close()
    status, body = await racing
    # It had read "ended, resumable"; re-checked on the committed row, it lost.
    assert (status, body["error"]) == (409, "token_used")
    status, body = await ms[0].api(alice, "listConsoleSessions", id=sid)
    (record,) = body["listconsolesessionsresponse"]["consolesession"]
    assert record["reconnects"] == 1 and "ended" not in record
