"""Recording through the real manager: the redemption says record (and the record keeps
it), the end report's summary is stored and listed, retention's deletions are noted, and
createConsoleRecordingPlayback answers a one-time URL on the proxy (431 without the right)."""

from __future__ import annotations

import pytest_twisted

SUMMARY = {"size": 4321, "sha256": "5e" * 32, "duration": 7.25, "complete": True}


def _base_beat():
    return {
        "public_host": "cpvm.example.com",
        "public_port": 8443,
        "tls": True,
        "address": "192.0.2.10",
        "capacity": 10,
        "version": "test",
    }


async def _recorded_session(m, creds, vm, key):
    token = (await m.endpoint(creds, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token)
    assert status == 200, body
    return body


@pytest_twisted.ensureDeferred
async def test_policy_reaches_the_proxy_and_the_listing(managers, log_events):
    m = await managers()
    alice = m.account("alice")
    admin = m.account("root", is_admin=True)
    recorded_vm = m.vm("alice", name="rec-01", record="always")
    plain_vm = m.vm("alice", name="plain-01")
    key = m.proxy_key("p1")
    await m.proxy(key, "heartbeat", {**_base_beat(), "active_sessions": []})

    plain = await _recorded_session(m, alice, plain_vm, key)
    assert "recording" not in plain
    body = await _recorded_session(m, alice, recorded_vm, key)
    assert body["recording"] is True
    sid = body["session_id"]
    acquired = [e for e in log_events if e.get("event") == "acquired" and e.get("session") == sid]
    assert acquired and acquired[0]["recorded"] is True

    # The end report carries the file's summary, the manager keeps it.
    report = {
        "session_id": sid,
        "reason": "client_closed",
        "bytes_to_client": 10,
        "bytes_to_server": 2,
        "duration": 7.3,
        "recording": SUMMARY,
    }
    status, _ = await m.proxy(
        key, "heartbeat", {**_base_beat(), "active_sessions": [], "ended": [report]}
    )
    assert status == 200
    status, listed = await m.api(admin, "listConsoleSessions", id=sid)
    session = listed["listconsolesessionsresponse"]["consolesession"][0]
    assert session["recording"] == SUMMARY
    status, listed = await m.api(admin, "listConsoleSessions", id=plain["session_id"])
    assert "recording" not in listed["listconsolesessionsresponse"]["consolesession"][0]

    # Playback: a user without the right is refused with 431, an admin gets a URL on p1.
    status, refused = await m.api(alice, "createConsoleRecordingPlayback", id=sid)
    assert status == 431, refused
    status, answer = await m.api(admin, "createConsoleRecordingPlayback", id=sid)
    assert status == 200, answer
    url = answer["createconsolerecordingplaybackresponse"]["consolerecordingplayback"]["url"]
    assert url.startswith("https://cpvm.example.com:8443/recording/play#ticket=")
    ticket = url.split("#ticket=", 1)[1]
    m.secrets_seen.append(ticket)
    other = m.proxy_key("p2")
    status, body = await m.proxy(other, "playback", {"ticket": ticket})
    assert (status, body["error"]) == (403, "wrong_proxy")
    status, body = await m.proxy(key, "playback", {"ticket": ticket})
    assert (status, body) == (200, {"session_id": sid})
    status, body = await m.proxy(key, "playback", {"ticket": ticket})
    assert (status, body["error"]) == (409, "ticket_used")
    status, body = await m.proxy(None, "playback", {"ticket": ticket})
    assert status == 401

    # Retention on the proxy deleted it: the record says so, no more playback.
    beat = {**_base_beat(), "active_sessions": [], "recordings_deleted": [sid]}
    assert (await m.proxy(key, "heartbeat", beat))[0] == 200
    status, listed = await m.api(admin, "listConsoleSessions", id=sid)
    assert "deleted" in listed["listconsolesessionsresponse"]["consolesession"][0]["recording"]
    status, refused = await m.api(admin, "createConsoleRecordingPlayback", id=sid)
    assert status == 431 and "deleted" in str(refused)


@pytest_twisted.ensureDeferred
async def test_account_playback_and_account_policy(managers):
    m = await managers(sections={"recording": {"account_playback": "true"}})
    alice = m.account("alice")
    bob = m.account("bob")
    vm = m.vm("alice")
    m.admin("account", "update", "alice", "--record", "always")
    key = m.proxy_key("p1")
    await m.proxy(key, "heartbeat", {**_base_beat(), "active_sessions": []})
    body = await _recorded_session(m, alice, vm, key)
    assert body["recording"] is True
    sid = body["session_id"]
    # Not finished yet: nothing to play.
    status, refused = await m.api(alice, "createConsoleRecordingPlayback", id=sid)
    assert status == 431 and "not finished" in str(refused)
    report = {
        "session_id": sid,
        "reason": "server_closed",
        "bytes_to_client": 1,
        "bytes_to_server": 1,
        "duration": 1,
        "recording": {**SUMMARY, "complete": False},
    }
    await m.proxy(key, "heartbeat", {**_base_beat(), "active_sessions": [], "ended": [report]})
    status, answer = await m.api(alice, "createConsoleRecordingPlayback", id=sid)
    assert status == 200, answer
    status, refused = await m.api(bob, "createConsoleRecordingPlayback", id=sid)
    assert status == 431
    status, refused = await m.api(alice, "createConsoleRecordingPlayback")
    assert status == 431
