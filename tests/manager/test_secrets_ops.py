"""Secrets never stored or logged in plain text; admin CLI; health and metrics."""

from __future__ import annotations

import io
import json
import sqlite3

import pytest_twisted
import treq
from twisted.logger import formatEvent

from cpvm.manager import admin
from cpvm.manager.admin import account_commands


def _all_log_text(events):
    text = []
    for e in events:
        text.append(repr(e))
        try:
            text.append(formatEvent(e))
        except Exception:
            pass
    return "\n".join(text)


@pytest_twisted.ensureDeferred
async def test_no_plaintext_secret_in_sqlite_or_logs(managers, log_events):
    m = await managers()
    alice = m.account("alice")
    root = m.account("root", is_admin=True)
    vm = m.vm("alice", password="vnc-pass-" + "XyZ123")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    extra = "caller-extra-token-98765"
    m.secrets_seen.append(extra)
    answer = await m.endpoint(alice, vm, token=extra)
    token = answer["websocket"]["token"]
    await m.redeem(key, token, "wrong extra")
    status, body = await m.redeem(key, token, extra)
    assert status == 200 and body["vnc"]["password"] == "vnc-pass-XyZ123"
    await m.redeem(key, token, extra)
    await m.api(root, "listConsoleSessions")
    status, _ = await m.api(alice, "listConsoleSessions", method="POST")
    assert status == 200
    # a failing request logs too
    await m.api(type(alice)("a", alice.api_key, "bad-secret"), "listConsoleSessions")

    db_path = m.directory / "data" / "manager.db"
    conn = sqlite3.connect(db_path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert {"accounts", "api_keys", "vms", "proxies", "console_sessions", "schema_version"} <= set(
        tables
    )
    dump = repr({t: conn.execute(f"SELECT * FROM {t}").fetchall() for t in tables})
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = b"".join(p.read_bytes() for p in db_path.parent.glob("manager.db*"))
    logged = _all_log_text(log_events)
    assert "GET /client/api" in logged and "POST /proxy/v1/redeem" in logged
    assert "?" not in "".join(
        formatEvent(e) for e in log_events if e.get("log_namespace") == "cpvm.manager.access"
    )
    # secrets_seen holds every signature the harness sent, too
    secrets = m.secrets_seen + [alice.api_key]
    assert token in m.secrets_seen and extra in secrets
    for secret in secrets:
        if secret != alice.api_key:  # the apiKey is a public id; it may be stored
            assert secret not in dump, secret
            assert secret.encode() not in raw, secret
        assert secret not in logged, secret


def test_generated_keys_never_start_with_a_dash(monkeypatch):
    # A key starting with "-" reads as an option on the admin command line.
    drawn = iter(["-looks-like-an-option", "_fine-key"])
    monkeypatch.setattr(account_commands.secrets, "token_urlsafe", lambda n: next(drawn))
    assert admin.command_line_safe_key() == "_fine-key"


def test_admin_cli(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text(f"[server]\ndata_dir = {tmp_path}/data\n")

    def run(*args, stdin=None):
        out = io.StringIO()
        if stdin is not None:
            import sys

            old, sys.stdin = sys.stdin, io.StringIO(stdin)
        try:
            status = admin.main(["--config", str(conf), *args], out=out)
        finally:
            if stdin is not None:
                sys.stdin = old
        return status, out.getvalue()

    assert run("account", "create", "root", "--admin")[0] == 0
    assert run("account", "create", "root")[0] == 1  # duplicate
    status, out = run("key", "create", "root")
    assert status == 0 and "apiKey:" in out and "secretKey:" in out
    status, out = run("--json", "account", "list")
    assert json.loads(out)[0]["role"] == "admin"
    status, out = run(
        "vm",
        "add",
        "--id",
        "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f",
        "--name",
        "db",
        "--owner",
        "root",
        "--vnc-host",
        "10.0.0.9",
        "--vnc-port",
        "5900",
        "--vnc-password-stdin",
        "--tls",
        "anonymous",
        stdin="topsecret-pw\n",
    )
    assert (status, out.strip()) == (0, "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f")
    status, out = run("vm", "list")
    assert "db" in out and "10.0.0.9:5900" in out and "anonymous" in out
    assert "topsecret-pw" not in out
    assert run("vm", "update", "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f", "--state", "Stopped")[0] == 0
    status, out = run("--json", "vm", "list")
    assert json.loads(out)[0]["state"] == "Stopped" and "topsecret-pw" not in out
    status, out = run("proxy-key", "create", "--name", "cpvm-1")
    assert status == 0 and out.startswith("cpvmk_")
    proxy_id = out.strip()[len("cpvmk_") :].split(".")[0]
    status, out = run("proxy", "list")
    assert proxy_id in out and "down" in out and out.count(".") == 0
    assert run("proxy-key", "revoke", "cpvm-1")[0] == 0
    assert "revoked" in run("proxy", "list")[1]
    assert run("session", "list")[0] == 0
    assert run("vm", "remove", "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f")[0] == 0
    assert run("vm", "remove", "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f")[0] == 1
    status, out = run("key", "list")
    api_key = out.splitlines()[1].split()[1]
    assert run("key", "revoke", api_key)[0] == 0
    assert run("key", "revoke", api_key)[0] == 1
    raw = b"".join(p.read_bytes() for p in (tmp_path / "data").glob("manager.db*"))
    assert b"topsecret-pw" not in raw


@pytest_twisted.ensureDeferred
async def test_cli_changes_seen_by_running_service(managers):
    m = await managers()
    bob = m.account("bob")
    vm = m.vm("bob")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    assert (await m.endpoint(bob, vm))["success"] is True
    m.admin("key", "revoke", bob.api_key)
    status, _ = await m.api(bob, "createConsoleEndpoint", virtualmachineid=vm)
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_metrics_only_for_allowed_addresses(managers):
    m = await managers(sections={"metrics": {"allow": "192.0.2.0/24"}})
    r = await treq.get(m.base + "/metrics", persistent=False)
    assert r.code == 404 and "cpvm_manager" not in await r.text()
    r = await treq.get(m.base + "/healthz", persistent=False)
    assert r.code == 200


@pytest_twisted.ensureDeferred
async def test_health_ready_metrics(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    await m.redeem(key, token)
    await m.redeem(key, token)
    await m.api(alice, "nope")
    r = await treq.get(m.base + "/healthz", persistent=False)
    assert r.code == 200 and (await r.text()) == "ok\n"
    r = await treq.get(m.base + "/readyz", persistent=False)
    assert r.code == 200
    r = await treq.get(m.base + "/metrics", persistent=False)
    text = await r.text()
    assert r.code == 200
    assert "cpvm_manager_tokens_issued_total 1.0" in text
    assert 'cpvm_manager_redemptions_total{outcome="ok"} 1.0' in text
    assert 'cpvm_manager_redemptions_total{outcome="token_used"} 1.0' in text
    assert (
        'cpvm_manager_api_requests_total{command="createConsoleEndpoint",status="200"} 1.0' in text
    )
    assert 'cpvm_manager_api_requests_total{command="unknown",status="432"} 1.0' in text
    assert "cpvm_manager_redemption_seconds_count 2.0" in text
    # a database that went away makes /readyz fail, /healthz stays up
    from twisted.internet.defer import fail

    m.service.database.ping = lambda: fail(RuntimeError("database is down"))
    r = await treq.get(m.base + "/readyz", persistent=False)
    assert r.code == 503
