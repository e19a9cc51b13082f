"""Recording policy in the manager: the rule (always wins, then never, then the default),
who may play back, the CLI that sets it per VM and per account, and the store's tickets
(one-time, per proxy, expiring) and end-report summaries (migration 7)."""

from __future__ import annotations

import io
import json

import pytest

from cpvm.manager import admin, recording_policy
from cpvm.manager.config import load_config
from cpvm.manager.connections import connect_sync, run_sync
from cpvm.manager.store import recordings as rs


@pytest.mark.parametrize(
    ("vm", "account", "default", "recorded"),
    [
        (None, None, "never", False),
        (None, None, "always", True),
        ("always", "never", "never", True),
        ("never", "always", "never", True),
        ("never", None, "always", False),
        (None, "never", "always", False),
        (None, "always", "never", True),
    ],
)
def test_always_wins_then_never_then_the_default(vm, account, default, recorded):
    assert recording_policy.is_recorded(vm, account, default) is recorded


def test_who_may_play_back():
    ok = recording_policy.may_play_back
    assert ok(is_admin=True, caller_account_id="a", session_account_id="b", account_playback=False)
    assert not ok(
        is_admin=False, caller_account_id="a", session_account_id="a", account_playback=False
    )
    assert ok(is_admin=False, caller_account_id="a", session_account_id="a", account_playback=True)
    assert not ok(
        is_admin=False, caller_account_id="a", session_account_id="b", account_playback=True
    )


def test_tickets_look_like_tokens_and_only_their_hash_is_kept():
    t = recording_policy.new_ticket()
    assert recording_policy.ticket_hash(t.secret) == t.hash != t.secret
    assert recording_policy.ticket_hash("../../etc") is None
    url = recording_policy.playback_url("https://p1.example:8443/", t.secret)
    assert url == f"https://p1.example:8443/recording/play#ticket={t.secret}"


@pytest.fixture
def run(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text(f"[server]\ndata_dir = {tmp_path}/data\n")

    def run(*args):
        out = io.StringIO()
        return admin.main(["--config", str(conf), *args], out=out), out.getvalue()

    run.config = load_config(str(conf))
    return run


def _sql(run, fn, *args):
    conn = connect_sync(run.config.database)
    try:
        return run_sync(conn, run.config.database.kind, fn, *args)
    finally:
        conn.close()


def test_cli_sets_the_policy_per_vm_and_per_account(run):
    assert run("account", "create", "alice")[0] == 0
    status, vm_id = run(
        "vm",
        "add",
        "--name",
        "w1",
        "--owner",
        "alice",
        "--vnc-host",
        "127.0.0.1",
        "--vnc-port",
        "5901",
        "--record",
        "always",
    )
    vm_id = vm_id.strip()
    assert status == 0
    assert run("account", "update", "alice", "--record", "never")[0] == 0
    account_id = json.loads(run("--json", "account", "list")[1])[0]["id"]
    assert _sql(run, rs.policies, vm_id, account_id) == ("always", "never")
    vms = json.loads(run("--json", "vm", "list")[1])
    assert vms[0]["record"] == "always"
    assert json.loads(run("--json", "account", "list")[1])[0]["record"] == "never"
    # Only --record: the VM's other settings stay as they were.
    assert run("vm", "update", vm_id, "--record", "default")[0] == 0
    assert _sql(run, rs.policies, vm_id, account_id) == (None, "never")
    assert json.loads(run("--json", "vm", "list")[1])[0]["vnc"] == "127.0.0.1:5901"
    status, out = run("vm", "update", "00000000-0000-4000-8000-000000000000", "--record", "never")
    assert status != 0


def _session(tx, sid, proxy="p1"):
    tx.execute(
        "INSERT INTO console_sessions (id, expires_at, created_at, account_id, account_name, "
        "vm_id, vm_name, proxy_id, acquired_at) VALUES (?, 1e12, 0, 'acc', 'alice', 'vm', 'w1', ?, 1)",
        (sid, proxy),
    )


def test_tickets_work_once_for_their_proxy_until_they_expire(run):
    run("account", "list")  # creates and migrates the database
    t = recording_policy.new_ticket()
    late = recording_policy.new_ticket()

    def setup(tx):
        _session(tx, "s1")
        rs.insert_ticket(
            tx,
            ticket_hash=t.hash,
            session_id="s1",
            proxy_id="p1",
            created_by="admin",
            now=100.0,
            ttl=300,
        )
        rs.insert_ticket(
            tx,
            ticket_hash=late.hash,
            session_id="s1",
            proxy_id="p1",
            created_by="admin",
            now=100.0,
            ttl=300,
        )

    _sql(run, setup)
    assert _sql(run, rs.redeem_ticket, t.hash, "p2", 110.0) == ("wrong_proxy", None)
    assert _sql(run, rs.redeem_ticket, t.hash, "p1", 110.0) == ("ok", "s1")
    assert _sql(run, rs.redeem_ticket, t.hash, "p1", 111.0) == ("ticket_used", None)
    assert _sql(run, rs.redeem_ticket, late.hash, "p1", 401.0) == ("expired_ticket", None)
    assert _sql(run, rs.redeem_ticket, "0" * 64, "p1", 110.0) == ("invalid_ticket", None)
    assert _sql(run, rs.purge_tickets, 100.0 + 300 + 86401) == 2


def test_summary_and_deletion_only_for_recorded_sessions_of_that_proxy(run):
    run("account", "list")

    def setup(tx):
        _session(tx, "s1")
        _session(tx, "s2")
        rs.mark_recorded(tx, "s1")

    _sql(run, setup)
    summary = {"size": 1234, "sha256": "ab" * 32, "duration": 12.5, "complete": False}
    _sql(run, rs.store_summary, "s1", "p1", summary)
    _sql(run, rs.store_summary, "s2", "p1", summary)  # not recorded: ignored
    got = _sql(run, rs.recordings_of, ["s1", "s2"])
    assert got["s1"].listing() == {
        "size": 1234,
        "sha256": "ab" * 32,
        "duration": 12.5,
        "complete": False,
    }
    assert got["s2"].listing() is None
    assert _sql(run, rs.mark_deleted, "p2", ["s1"], 500.0) == 0
    assert _sql(run, rs.mark_deleted, "p1", ["s1", "s2"], 500.0) == 1
    assert _sql(run, rs.get_recording, "s1").listing()["deleted"] == 500.0


def test_end_report_recording_object_is_checked():
    from cpvm.manager.recording_api import RecordingReportError, parse_deleted, parse_summary

    good = {"size": 10, "sha256": "0" * 64, "duration": 1, "complete": True}
    assert parse_summary(good) == {**good, "duration": 1.0}
    assert parse_summary(None) is None
    for bad in (
        {**good, "size": -1},
        {**good, "size": True},
        {**good, "sha256": "A" * 64},
        {**good, "duration": float("nan")},
        {**good, "complete": 1},
        [],
    ):
        with pytest.raises(RecordingReportError):
            parse_summary(bad)
    sid = "5f1c0d2e-0000-4000-8000-000000000001"
    assert parse_deleted({"recordings_deleted": [sid.upper()]}) == [sid]
    assert parse_deleted({}) == []
    with pytest.raises(RecordingReportError):
        parse_deleted({"recordings_deleted": ["../x"]})
