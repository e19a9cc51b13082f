"""Proxy selection by load, liveness and stickiness through the APIs; heartbeats; the cleanup
timer. (The selection rule itself: tests/manager/test_decisions.py.)"""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock


@pytest_twisted.ensureDeferred
async def test_selection_across_three_proxies(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(clock=clock)
    alice = m.account("alice")
    vms = [m.vm("alice", name=f"vm{i}") for i in range(4)]
    keys = {name: m.proxy_key(name) for name in ("p1", "p2", "p3")}
    await m.heartbeat(keys["p1"], host="p1.example", capacity=10, active=["x"] * 5)
    await m.heartbeat(keys["p2"], host="p2.example", capacity=10, active=["x"] * 2)
    await m.heartbeat(keys["p3"], host="p3.example", capacity=100, active=["x"] * 30)
    # p2 (0.2) < p1 (0.5) and p3 (0.3)
    first = await m.endpoint(alice, vms[0])
    assert first["websocket"]["host"] == "p2.example"
    # p2 now carries a pending token: 3/10 = 0.3 ties p3 (30/100); smaller absolute load wins
    second = await m.endpoint(alice, vms[1])
    assert second["websocket"]["host"] == "p2.example"
    third = await m.endpoint(alice, vms[2])  # p2 4/10 > p3 0.3
    assert third["websocket"]["host"] == "p3.example"

    # stickiness: vm0 has a session on p2; even when p2 is busier it stays there
    status, body = await m.redeem(keys["p2"], first["websocket"]["token"])
    assert status == 200
    await m.heartbeat(keys["p2"], host="p2.example", capacity=10, active=["x"] * 8)
    again = await m.endpoint(alice, vms[0])
    assert again["websocket"]["host"] == "p2.example"
    other = await m.endpoint(alice, vms[3])
    assert other["websocket"]["host"] == "p3.example"

    # a dead proxy (stale heartbeat) is never chosen, even sticky or idle
    clock.advance(15)
    await m.heartbeat(keys["p1"], host="p1.example", capacity=10, active=[])
    await m.heartbeat(keys["p3"], host="p3.example", capacity=100, active=["x"] * 99)
    clock.advance(10)  # p2's beat is 25 s old > proxy_timeout 20
    moved = await m.endpoint(alice, vms[0])
    assert moved["websocket"]["host"] == "p1.example"
    # full proxies are skipped: p3 99+pending/100 ... make p1 full
    await m.heartbeat(keys["p1"], host="p1.example", capacity=2, active=["x", "y"])
    await m.heartbeat(keys["p3"], host="p3.example", capacity=100, active=["x"] * 100)
    none = await m.endpoint(alice, vms[1])
    assert none == {"success": False, "result": False, "details": "no console proxy available"}


@pytest_twisted.ensureDeferred
async def test_cleanup_ends_lost_sessions_and_purges(managers, log_events):
    clock = Clock()
    clock.advance(1_800_000_000)
    # the timer would run cleanup on every clock.advance; call it by hand instead
    m = await managers(
        sections={"sessions": {"retention_days": "1", "cleanup_interval": "1000000"}}, clock=clock
    )
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    live = (await m.endpoint(alice, vm))["websocket"]["token"]
    unused = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, live)
    sid = body["session_id"]
    clock.advance(61)  # past proxy_timeout (20) and the token TTL (60)
    result = await m.service.broker.cleanup()
    assert [r.id for r in result.lost] == [sid]
    status, body = await m.api(alice, "listConsoleSessions", id=sid)
    s = body["listconsolesessionsresponse"]["consolesession"][0]
    assert s["endreason"] == "proxy_lost"
    # a late end report from the proxy still lands (it knows better than our guess)
    status, _ = await m.proxy(
        key,
        f"sessions/{sid}/end",
        {"reason": "client_closed", "bytes_to_client": 5, "bytes_to_server": 6, "duration": 20},
    )
    assert status == 204
    # the unused token: still "expired" within the grace, then purged (session "expired")
    status, body = await m.redeem(key, unused)
    assert body["error"] == "expired_token"
    clock.advance(400)
    result = await m.service.broker.cleanup()
    assert result.expired == 1
    await m.heartbeat(key)
    status, body = await m.redeem(key, unused)
    assert body["error"] == "invalid_token"
    status, body = await m.api(alice, "listConsoleSessions")
    reasons = sorted(x["endreason"] for x in body["listconsolesessionsresponse"]["consolesession"])
    assert reasons == ["client_closed", "expired"]
    clock.advance(86400 + 1)
    result = await m.service.broker.cleanup()
    assert result.deleted == 2
    # Session events (the VM's vm_added, from the CLI, is audited too).
    audit = [e for e in log_events if e.get("audit") and not e["event"].startswith("vm_")]
    assert [e["event"] for e in audit] == ["created", "created", "acquired", "ended", "ended"]
    assert audit[3]["reason"] == "proxy_lost" and audit[4]["reason"] == "client_closed"
    assert audit[4]["bytes_to_client"] == 5 and audit[4]["duration"] == 20


@pytest_twisted.ensureDeferred
async def test_cleanup_timer_runs(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(sections={"sessions": {"cleanup_interval": "30"}}, clock=clock)
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    status, body = await m.redeem(key, (await m.endpoint(alice, vm))["websocket"]["token"])
    clock.advance(30)  # proxy silent for 30 s > 20 s: the timer's run ends the session
    for _ in range(100):  # bounded: the timer's transaction runs in the pool thread
        status, listed = await m.api(alice, "listConsoleSessions", id=body["session_id"])
        session = listed["listconsolesessionsresponse"]["consolesession"][0]
        if session.get("endreason"):
            break
    assert session["endreason"] == "proxy_lost"


@pytest_twisted.ensureDeferred
async def test_heartbeat_carries_end_reports(managers, log_events):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    other = m.proxy_key("p2")
    await m.heartbeat(key)
    sids = []
    for _ in range(2):
        token = (await m.endpoint(alice, vm))["websocket"]["token"]
        sids.append((await m.redeem(key, token))[1]["session_id"])
    base = {
        "public_host": "cpvm.example.com",
        "public_port": 8080,
        "tls": False,
        "capacity": 10,
        "active_sessions": [],
    }
    report = {
        "reason": "client_closed",
        "client_address": "203.0.113.9",
        "bytes_to_client": 700,
        "bytes_to_server": 70,
        "duration": 4.5,
    }
    # Another proxy cannot end them; in a batch with a malformed report only that report
    # is dropped (refusing the whole batch would fail every later heartbeat too).
    status, _ = await m.proxy(
        other, "heartbeat", {**base, "ended": [{"session_id": sids[0], **report}]}
    )
    assert status == 200
    status, body = await m.api(alice, "listConsoleSessions", activeonly="true")
    assert body["listconsolesessionsresponse"]["count"] == 2
    status, body = await m.proxy(
        key,
        "heartbeat",
        {**base, "ended": [{"session_id": sids[0], **report}, {"session_id": "x", **report}]},
    )
    assert status == 200 and body["terminate"] == []
    status, body = await m.api(alice, "listConsoleSessions", activeonly="true")
    assert [r["id"] for r in body["listconsolesessionsresponse"]["consolesession"]] == [sids[1]]
    status, body = await m.proxy(
        key, "heartbeat", {**base, "ended": [{"session_id": s, **report} for s in sids[1:]]}
    )
    assert status == 200 and body["terminate"] == []
    status, body = await m.api(alice, "listConsoleSessions")
    rows = body["listconsolesessionsresponse"]["consolesession"]
    assert sorted(r["id"] for r in rows) == sorted(sids)
    assert all(r["endreason"] == "client_closed" and r["bytestoclient"] == 700 for r in rows)
    ended = [e for e in log_events if e.get("event") == "ended"]
    assert sorted(e["session"] for e in ended) == sorted(sids)


@pytest_twisted.ensureDeferred
async def test_heartbeat_reconciles_sessions_a_restarted_process_lost(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(sections={"sessions": {"cleanup_interval": "1000000"}}, clock=clock)
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)

    async def redeemed(worker):
        token = (await m.endpoint(alice, vm))["websocket"]["token"]
        status, body = await m.proxy(
            key,
            "redeem",
            {"token": token, "extra": None, "client_address": "127.0.0.1", "worker": worker},
        )
        assert status == 200, body
        return body["session_id"]

    kept, lost, other_worker = await redeemed(0), await redeemed(0), await redeemed(1)
    base = {"public_host": "cpvm.example.com", "public_port": 8080, "tls": False, "capacity": 10}
    # A session redeemed a moment ago may be missing from a heartbeat: it is kept.
    status, _ = await m.proxy(key, "heartbeat", {**base, "worker": 0, "active_sessions": []})
    assert status == 200
    status, body = await m.api(alice, "listConsoleSessions", activeonly="true")
    assert body["listconsolesessionsresponse"]["count"] == 3
    clock.advance(30)  # longer than proxy_timeout (20 s)
    # Worker 0 restarted and still has only one of its sessions; worker 1 is not concerned.
    status, _ = await m.proxy(key, "heartbeat", {**base, "worker": 0, "active_sessions": [kept]})
    assert status == 200
    status, body = await m.api(alice, "listConsoleSessions")
    rows = {r["id"]: r for r in body["listconsolesessionsresponse"]["consolesession"]}
    assert rows[lost]["endreason"] == "proxy_lost"
    assert "endreason" not in rows[kept] or rows[kept]["endreason"] in (None, "")
    assert "endreason" not in rows[other_worker] or not rows[other_worker]["endreason"]
    # Its real end report, arriving late, replaces the guess.
    status, _ = await m.proxy(
        key,
        f"sessions/{lost}/end",
        {"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 2, "duration": 3},
    )
    assert status == 204
    status, body = await m.api(alice, "listConsoleSessions", id=lost)
    assert body["listconsolesessionsresponse"]["consolesession"][0]["endreason"] == "client_closed"
