"""One-time token redemption (docs/management-api.md, POST /proxy/v1/redeem)."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock


async def _setup(m, **vm_options):
    alice = m.account("alice")
    vm = m.vm("alice", **vm_options)
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    return alice, vm, key


@pytest_twisted.ensureDeferred
async def test_redeem_success_then_replay_refused(managers):
    m = await managers(sections={"sessions": {"idle_timeout": "600"}})
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token, None, "203.0.113.7")
    assert status == 200, body
    assert body == {
        "session_id": body["session_id"],
        "vm": {"id": vm, "name": "web-01"},
        "vnc": {
            "host": "10.0.0.5",
            "port": 5901,
            "password": "vncsecret-1",
            "tls": "none",
            "ca_pem": None,
            "server_name": None,
        },
        "limits": {"idle_timeout": 600, "max_duration": None},
        "account": "alice",
        "view_only": False,
        "viewer_policy": "shared",
        "taken_over": [],
    }
    status, body = await m.redeem(key, token, None, "203.0.113.7")
    assert (status, body["error"]) == (409, "token_used")
    status, body = await m.redeem(key, "no-such-token", None)
    assert (status, body["error"]) == (404, "invalid_token")


@pytest_twisted.ensureDeferred
async def test_vm_tls_settings_reach_the_proxy(managers, tmp_path):
    m = await managers()
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    alice, vm, key = await _setup(m, tls="x509", ca_file=str(ca), server_name="vnc.internal")
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token)
    assert status == 200
    assert body["vnc"]["tls"] == "x509" and body["vnc"]["server_name"] == "vnc.internal"
    assert body["vnc"]["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")


@pytest_twisted.ensureDeferred
async def test_proxy_auth_required(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    for bad in (None, "cpvmk_nothing", key + "x", key.split(".")[0] + ".wrong", "Basic abc"):
        status, body = await m.proxy(bad, "redeem", {"token": token, "client_address": "1.2.3.4"})
        assert status == 401 and body["error"] == "unauthorized", bad
    m.admin("proxy-key", "revoke", "p1")
    status, body = await m.redeem(key, token)
    assert status == 401
    status, body = await m.proxy(key, "heartbeat", {})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_bad_requests(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    for body in (
        {},
        {"token": 5, "client_address": "1.2.3.4"},
        {"token": "x" * 513, "client_address": "1.2.3.4"},
        {"token": "t"},
        [],
    ):
        status, answer = await m.proxy(key, "redeem", body)
        assert (status, answer["error"]) == (400, "bad_request"), body
    status, answer = await m.proxy(key, "nothing", {})
    assert status == 404
    status, answer = await m.proxy(
        key,
        "sessions/00000000-0000-4000-8000-000000000000/end",
        {"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1},
    )
    assert (status, answer["error"]) == (404, "unknown_session")
    status, answer = await m.proxy(key, "sessions/x/end", {"reason": "bogus"})
    assert status == 400


@pytest_twisted.ensureDeferred
async def test_expired_token_refused(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(sections={"tokens": {"ttl": "30"}}, clock=clock)
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    clock.advance(30.5)
    status, body = await m.redeem(key, token)
    assert (status, body["error"]) == (410, "expired_token")
    await m.heartbeat(key)  # the proxy's last beat is older than proxy_timeout by now
    token2 = (await m.endpoint(alice, vm))["websocket"]["token"]
    clock.advance(29)
    status, body = await m.redeem(key, token2)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_wrong_extra_does_not_burn_the_token(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(clock=clock)
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm, token="right-extra"))["websocket"]["token"]
    for wrong in ("wrong-extra", None, "right-extr", "right-extra "):
        status, body = await m.redeem(key, token, wrong)
        assert (status, body["error"]) == (403, "extra_mismatch"), wrong
    status, body = await m.redeem(key, token, "right-extra")
    assert status == 200
    # no extra at creation: giving one is a mismatch too
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token, "unexpected")
    assert (status, body["error"]) == (403, "extra_mismatch")
    # ...and the right one stays usable until its TTL, not after
    token = (await m.endpoint(alice, vm, token="e"))["websocket"]["token"]
    await m.redeem(key, token, "bad")
    clock.advance(61)
    status, body = await m.redeem(key, token, "e")
    assert (status, body["error"]) == (410, "expired_token")


@pytest_twisted.ensureDeferred
async def test_wrong_proxy_and_vm_unavailable(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    other = m.proxy_key("p2")
    await m.heartbeat(other, capacity=1, active=["busy"])  # full: never chosen
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(other, token)
    assert (status, body["error"]) == (403, "wrong_proxy")
    m.admin("vm", "update", vm, "--state", "Stopped")
    status, body = await m.redeem(key, token)
    assert (status, body["error"]) == (409, "vm_unavailable")
    m.admin("vm", "update", vm, "--state", "Running")
    status, body = await m.redeem(key, token)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_address_binding(managers):
    m = await managers(sections={"tokens": {"bind_client_address": "true"}})
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token, None, "203.0.113.7")
    assert (status, body["error"]) == (403, "address_mismatch")
    status, body = await m.redeem(key, token, None, "127.0.0.1")
    assert status == 200
    # X-Forwarded-For from an untrusted peer is ignored
    status, body = await m.api(
        alice,
        "createConsoleEndpoint",
        virtualmachineid=vm,
        headers={"X-Forwarded-For": "198.51.100.9"},
    )
    token = body["createconsoleendpointresponse"]["consoleendpoint"]["websocket"]["token"]
    status, body = await m.redeem(key, token, None, "198.51.100.9")
    assert (status, body["error"]) == (403, "address_mismatch")


@pytest_twisted.ensureDeferred
async def test_address_binding_behind_trusted_proxies(managers):
    m = await managers(
        sections={
            "tokens": {"bind_client_address": "true"},
            "server": {"trusted_proxies": "127.0.0.0/8, 10.0.0.0/8"},
        }
    )
    alice, vm, key = await _setup(m)
    # rightmost untrusted hop: 10.9.9.9 is a trusted LB, 198.51.100.9 the browser,
    # 6.6.6.6 whatever the browser wrote itself
    status, body = await m.api(
        alice,
        "createConsoleEndpoint",
        virtualmachineid=vm,
        headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.9, 10.9.9.9"},
    )
    token = body["createconsoleendpointresponse"]["consoleendpoint"]["websocket"]["token"]
    status, body = await m.redeem(key, token, None, "6.6.6.6")
    assert (status, body["error"]) == (403, "address_mismatch")
    status, body = await m.redeem(key, token, None, "198.51.100.9")
    assert status == 200
    status, body = await m.api(alice, "listConsoleSessions", id=body["session_id"])
    assert body["listconsolesessionsresponse"]["consolesession"][0]["creatoraddress"] == (
        "198.51.100.9"
    )


async def _race(redeemers, key_for, token, n=50):
    results = await gatherResults(
        [
            Deferred.fromCoroutine(redeemers[i % len(redeemers)].redeem(key_for, token, None))
            for i in range(n)
        ]
    )
    return sorted(status for status, _ in results), results


@pytest_twisted.ensureDeferred
async def test_concurrent_redemptions_sqlite(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    for _ in range(2):
        token = (await m.endpoint(alice, vm))["websocket"]["token"]
        statuses, results = await _race([m], key, token)
        assert statuses == [200] + [409] * 49
        assert all(b["error"] == "token_used" for s, b in results if s != 200)


@pytest_twisted.ensureDeferred
async def test_key_checked_before_body_errors_are_told(managers):
    """The key is checked in the request's own transaction; a caller without a valid key
    gets 401 whatever its body or session id, a valid one gets 400 / 404."""
    m = await managers()
    alice, vm, key = await _setup(m)
    bad_key = key.split(".")[0] + ".wrong"
    end_bad_id = "sessions/not-a-uuid/end"
    end_body = {
        "reason": "client_closed",
        "bytes_to_client": 1,
        "bytes_to_server": 1,
        "duration": 1,
    }
    for path, body, valid_status in (
        ("redeem", {"token": 5}, 400),
        ("heartbeat", {}, 400),
        (end_bad_id, end_body, 404),
        ("sessions/x/end", {"reason": "nope"}, 400),
    ):
        status, answer = await m.proxy(bad_key, path, body)
        assert (status, answer["error"]) == (401, "unauthorized"), path
        status, answer = await m.proxy(key, path, body)
        assert status == valid_status, (path, answer)
    # A refused key neither burns nor reveals the token: it redeems afterwards.
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, answer = await m.redeem(bad_key, token)
    assert status == 401
    status, answer = await m.redeem(key, token)
    assert status == 200, answer


@pytest_twisted.ensureDeferred
async def test_one_bad_end_report_does_not_poison_the_heartbeat(managers):
    """A report the manager cannot accept is dropped with a log line; the rest of the batch
    is recorded and the heartbeat answered, so later heartbeats are not refused forever."""
    m = await managers()
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, body = await m.redeem(key, token)
    assert status == 200, body
    good = {
        "session_id": body["session_id"],
        "reason": "client_closed",
        "bytes_to_client": 10,
        "bytes_to_server": 20,
        "duration": 1.5,
    }
    bad = {
        "session_id": "00000000-0000-4000-8000-000000000001",
        "reason": "no_such_reason",
        "bytes_to_client": 1,
        "bytes_to_server": 1,
        "duration": 1,
    }
    beat = {
        "public_host": "cpvm.example.com",
        "public_port": 8080,
        "tls": False,
        "capacity": 10,
        "active_sessions": [],
        "ended": [bad, "not an object", good],
    }
    status, answer = await m.proxy(key, "heartbeat", beat)
    assert status == 200, answer
    status, sessions = await m.api(alice, "listConsoleSessions", activeonly="false")
    assert status == 200, sessions
    [record] = sessions["listconsolesessionsresponse"]["consolesession"]
    assert record["endreason"] == "client_closed" and record["bytestoserver"] == 20
