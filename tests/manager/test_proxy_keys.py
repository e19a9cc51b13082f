"""A stolen proxy key (docs/security.md): what its holder can no longer do to the manager.

The manager runs for real (its HTTP listener on 127.0.0.1, its database); the attacker is
a plain HTTP client. On Linux all of 127.0.0.0/8 is local, so a client bound to
127.0.0.2 is a caller from another network than a key allowed only from 127.0.0.1/32.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.web.client import Agent

OUTSIDER = "127.0.0.2"


async def proxy_from(
    m, source: str, key: str, path: str, body: Any, headers: dict[str, list[str]] | None = None
) -> tuple[int, Any]:
    """A proxy API call from TCP source address ``source``."""
    hdrs = {
        "Content-Type": ["application/json"],
        "Authorization": [f"Bearer {key}"],
        **(headers or {}),
    }
    agent = Agent(reactor, bindAddress=(source, 0))
    response = await treq.post(
        f"{m.base}/proxy/v1/{path}", data=json.dumps(body).encode(), headers=hdrs, agent=agent
    )
    text = await response.text()
    return response.code, json.loads(text) if text else None


def beat(host: str = "cpvm.example.com", capacity: int = 10) -> dict[str, Any]:
    return {
        "public_host": host,
        "public_port": 8443,
        "tls": True,
        "address": None,
        "capacity": capacity,
        "active_sessions": [],
        "version": "test",
    }


def proxies(m) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in json.loads(m.admin("--json", "proxy", "list"))}


def create_key(m, name: str, *options: str) -> str:
    key = m.admin("proxy-key", "create", "--name", name, *options).strip()
    assert key.startswith("cpvmk_")
    m.secrets_seen.append(key.split(".", 1)[1])
    return key


@pytest_twisted.ensureDeferred
async def test_stolen_key_claiming_huge_capacity_does_not_get_the_consoles(managers, log_events):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    good = create_key(m, "good", "--max-capacity", "1000")
    stolen = create_key(m, "stolen", "--max-capacity", "2")
    await m.heartbeat(good, host="cpvm.example.com", capacity=1000)
    for _ in range(2):  # repeated, as a real proxy would
        status, _ = await m.proxy(stolen, "heartbeat", beat("evil.example", 10**7))
        assert status == 200
    hosts = [(await m.endpoint(alice, vm))["websocket"]["host"] for _ in range(20)]
    # Without the ceiling, 10^7 "free" sessions drew every console to evil.example.
    assert hosts.count("evil.example") <= 2
    assert hosts.count("cpvm.example.com") >= 18
    listed = proxies(m)["stolen"]
    assert listed["max_capacity"] == 2 and listed["load"] == "0/2"
    clamps = [e for e in log_events if "above its key's ceiling" in e.get("log_format", "")]
    assert len(clamps) == 1 and clamps[0]["claimed"] == 10**7 and clamps[0]["ceiling"] == 2

    # A ceiling lowered to 0 drains the proxy at once, before its next heartbeat.
    m.admin("proxy-key", "update", "stolen", "--max-capacity", "0")
    hosts = [(await m.endpoint(alice, vm))["websocket"]["host"] for _ in range(5)]
    assert "evil.example" not in hosts
    assert proxies(m)["stolen"]["load"] == "0/0"


@pytest_twisted.ensureDeferred
async def test_key_used_from_outside_its_networks_is_refused(managers, log_events):
    # Even with every loopback address trusted for X-Forwarded-For: the TCP peer decides.
    m = await managers(sections={"server": {"trusted_proxies": "127.0.0.0/8"}})
    alice = m.account("alice")
    vm = m.vm("alice")
    key = create_key(m, "p1", "--allow", "127.0.0.1/32", "--max-capacity", "50")
    assert proxies(m)["p1"]["allow"] == "127.0.0.1/32"
    xff = {"X-Forwarded-For": ["127.0.0.1"]}

    status, body = await proxy_from(m, OUTSIDER, key, "heartbeat", beat("evil.example", 10**7), xff)
    assert (status, body["error"]) == (403, "source_not_allowed"), body
    assert proxies(m)["p1"]["status"] == "down"  # nothing recorded
    status, _ = await proxy_from(m, "127.0.0.1", key, "heartbeat", beat())
    assert status == 200

    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    redeem = {"token": token, "extra": None, "client_address": "203.0.113.7"}
    status, body = await proxy_from(m, OUTSIDER, key, "redeem", redeem, xff)
    assert (status, body["error"]) == (403, "source_not_allowed")
    assert "vnc" not in body
    status, body = await proxy_from(m, OUTSIDER, key, "redeem", {"bad": "body"})
    assert status == 403  # not 400: the body is not even looked at
    status, body = await proxy_from(m, OUTSIDER, "cpvmk_nosuch.key", "redeem", redeem)
    assert status == 401
    status, answer = await proxy_from(m, "127.0.0.1", key, "redeem", redeem)
    assert status == 200, answer  # the refused attempts did not burn the token
    end = {"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1}
    path = f"sessions/{answer['session_id']}/end"
    status, body = await proxy_from(m, OUTSIDER, key, path, end, xff)
    assert (status, body["error"]) == (403, "source_not_allowed")
    status, _ = await proxy_from(m, OUTSIDER, key, "sessions/not-a-uuid/end", end)
    assert status == 403
    status, _ = await proxy_from(m, "127.0.0.1", key, path, end)
    assert status == 204

    refusals = [
        e for e in log_events if "outside the key's allowed networks" in e.get("log_format", "")
    ]
    assert refusals and all(e["client_address"] == OUTSIDER for e in refusals)
    assert refusals[0]["proxy"] == key[len("cpvmk_") :].split(".")[0]
    assert key.split(".", 1)[1] not in repr(log_events)

    m.admin("proxy-key", "update", "p1", "--allow", "127.0.0.2", "127.0.0.1")
    status, _ = await proxy_from(m, OUTSIDER, key, "heartbeat", beat())
    assert status == 200
    m.admin("proxy-key", "update", "p1", "--allow", "any")
    assert proxies(m)["p1"]["allow"] == "any"


@pytest_twisted.ensureDeferred
async def test_heartbeat_with_a_bad_public_host_is_refused(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = create_key(m, "p1")
    await m.heartbeat(key, host="cpvm.example.com")
    for host in (
        "https://evil.example",
        "evil.example/x",
        "evil.example:1",
        "a@evil.example",
        "evil .example",
        "[::1]",
        "1.2.3",
        "evil.example\r\nX: y",
        "javascript:x",
    ):
        status, body = await m.proxy(key, "heartbeat", beat(host))
        assert (status, body["error"]) == (400, "bad_request"), host
        assert body["message"].startswith("public_host"), body
    answer = await m.endpoint(alice, vm)
    assert answer["websocket"]["host"] == "cpvm.example.com"
    assert answer["url"].startswith("http://cpvm.example.com:8080/")
    for host in ("::1", "192.0.2.1", "cpvm-2.example.com."):
        status, _ = await m.proxy(key, "heartbeat", beat(host))
        assert status == 200, host


def test_keys_from_before_migration_4_keep_working_without_limits(tmp_path):
    """An existing database (schema 3) gains the columns; its keys have no limits."""
    from cpvm.manager import db, store
    from cpvm.manager.config import DatabaseConfig
    from cpvm.manager.proxy_policy import NO_LIMITS

    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    conn = db.connect_sync(config)
    try:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        for version, statements in db.MIGRATIONS[:3]:
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, 0)", (version,))
        conn.execute(
            "INSERT INTO proxies (id, name, secret_hash, created_at, capacity) "
            "VALUES ('abcd1234', 'old', 'h', 0, 500)"
        )
    finally:
        conn.close()
    assert 4 in db.migrate(config, 1.0)
    conn = db.connect_sync(config)
    try:
        assert db.run_sync(conn, "sqlite", store.proxy_key_record, "abcd1234") == ("h", NO_LIMITS)
        policy = db.run_sync(
            conn, "sqlite", lambda tx: store.set_proxy_policy(tx, "old", max_capacity=100)
        )
        assert policy.max_capacity == 100 and policy.allowed_networks is None
        # The capacity the last heartbeat claimed is clamped at once.
        assert db.run_sync(conn, "sqlite", store.list_proxies)[0].capacity == 100
    finally:
        conn.close()
