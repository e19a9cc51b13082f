"""Viewer policy at redemption (cpvm/manager/viewers.py) on SQLite and a real PostgreSQL:
the decision, the takeover marks, and its atomicity when redemptions race."""

from __future__ import annotations

import itertools
import threading
import time
import uuid

import pytest

from cpvm.common.contract import ViewerPolicy
from cpvm.manager import db, store, viewers
from cpvm.manager.config import DatabaseConfig
from cpvm.manager.secrets_box import sha256_hex

VM = "11111111-1111-4111-8111-111111111111"
_names = itertools.count()


def redeem(tx, token: str, now: float, default=ViewerPolicy.SHARED, pause=None):
    """The redemption's order (consoles.py): policy check, the single-use write, takeover."""
    row = store.token_row(tx, sha256_hex(token))
    assert row is not None and row.vm is not None
    decision = viewers.check(
        tx, row.vm_id, row.session_id, row.view_only, row.vm.viewer_policy, default
    )
    if pause is not None:
        pause()  # hold the transaction open, as a slow manager would
    if decision.error is not None:
        return decision.error, []
    if not store.mark_acquired(tx, row.session_id, "192.0.2.1", now):
        return "token_used", []
    return None, viewers.take_over(tx, decision, row.vm_id, row.session_id, now)


def setup_vm(tx, policy: str | None, now: float) -> None:
    store.create_account(tx, "a-1", "alice", "user", now)
    vm = {"id": VM, "name": "web", "owner_id": "a-1", "state": "Running"}
    vm |= {"vnc_host": "h", "vnc_port": 5900, "vnc_tls": "none", "viewer_policy": policy}
    store.add_vm(tx, vm, now)
    store.create_proxy(tx, "p-1", "p1", "hash", now)


def issue(tx, now: float, view_only: bool = False) -> tuple[str, str]:
    token, session = uuid.uuid4().hex, str(uuid.uuid4())
    store.insert_session(
        tx,
        {
            "id": session,
            "token_hash": sha256_hex(token),
            "extra_hash": None,
            "expires_at": now + 60,
            "created_at": now,
            "account_id": "a-1",
            "account_name": "alice",
            "vm_id": VM,
            "vm_name": "web",
            "proxy_id": "p-1",
            "creator_address": None,
            "bound_address": None,
            "view_only": view_only,
        },
    )
    return token, session


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """(config, run) on a fresh schema: SQLite in a file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    else:
        postgres = request.getfixturevalue("postgres")
        dsn = postgres.create_database(f"viewers_{next(_names)}_{uuid.uuid4().hex[:8]}")
        config = DatabaseConfig("postgresql", None, dsn, 2)
    db.migrate(config, time.time())
    conn = db.connect_sync(config)
    yield config, lambda fn, *args: db.run_sync(conn, config.kind, fn, *args)
    conn.close()


def _state(tx, session: str):
    return tx.execute(
        "SELECT acquired_at IS NOT NULL, terminate_requested_at IS NOT NULL, end_request_reason "
        "FROM console_sessions WHERE id = ?",
        (session,),
    ).fetchone()


def test_shared_admits_every_console(database):
    _, run = database
    now = time.time()
    run(setup_vm, None, now)
    tokens = [run(issue, now)[0] for _ in range(3)]
    assert [run(redeem, t, now) for t in tokens] == [(None, [])] * 3


def test_exclusive_refuses_a_second_full_console_and_admits_view_only(database):
    _, run = database
    now = time.time()
    run(setup_vm, "exclusive", now)
    first, second, watcher = run(issue, now), run(issue, now), run(issue, now, True)
    assert run(redeem, first[0], now) == (None, [])
    assert run(redeem, second[0], now) == ("console_in_use", [])
    # Refused before the single-use write: the token still works once the first ends.
    assert tuple(run(_state, second[1]))[0] in (0, False)
    assert run(redeem, watcher[0], now) == (None, [])
    run(
        lambda tx: store.end_session(
            tx,
            first[1],
            "p-1",
            {"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1},
            now,
        )
    )
    assert run(redeem, second[0], now) == (None, [])


def test_the_manager_default_applies_to_vms_without_a_policy(database):
    _, run = database
    now = time.time()
    run(setup_vm, None, now)
    a, b = run(issue, now), run(issue, now)
    assert run(redeem, a[0], now, ViewerPolicy.EXCLUSIVE) == (None, [])
    assert run(redeem, b[0], now, ViewerPolicy.EXCLUSIVE) == ("console_in_use", [])


def test_takeover_marks_the_old_full_console_and_leaves_view_only_ones(database):
    _, run = database
    now = time.time()
    run(setup_vm, "takeover", now)
    old, watcher, new = run(issue, now), run(issue, now, True), run(issue, now)
    assert run(redeem, old[0], now) == (None, [])
    assert run(redeem, watcher[0], now) == (None, [])  # a watcher takes nothing over
    assert run(redeem, new[0], now) == (None, [old[1]])
    assert tuple(run(_state, old[1])) in ((1, 1, "taken_over"), (True, True, "taken_over"))
    assert tuple(run(_state, watcher[1]))[1] in (0, False)
    assert run(lambda tx: viewers.taken_over_among(tx, [old[1], watcher[1], new[1]])) == [old[1]]
    # The heartbeat's list of sessions to end has the taken-over one.
    assert old[1] in run(
        lambda tx: store.heartbeat(
            tx,
            "p-1",
            {
                "public_host": "h",
                "public_port": 8080,
                "tls": False,
                "address": None,
                "capacity": 10,
                "active_count": 3,
                "version": "t",
            },
            now,
        )
    )


def race(config, first_token: str, second_token: str, now: float) -> dict:
    """Redeem two tokens on two connections; the first holds its transaction open after
    its policy check while the second redeems."""
    results: dict[str, object] = {}
    checked = threading.Event()

    def redeem_on_own_connection(name, token, pause):
        if pause is None:
            checked.wait(10)
        conn = db.connect_sync(config)
        try:
            results[name] = db.run_sync(
                conn, config.kind, redeem, token, now, ViewerPolicy.SHARED, pause
            )
        finally:
            conn.close()

    def hold():
        checked.set()
        time.sleep(0.5)

    threads = [
        threading.Thread(target=redeem_on_own_connection, args=("a", first_token, hold)),
        threading.Thread(target=redeem_on_own_connection, args=("b", second_token, None)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _end(tx, session: str, now: float) -> None:
    tx.execute("UPDATE console_sessions SET ended_at = ? WHERE id = ?", (now, session))


def test_exclusive_is_atomic_when_two_redemptions_race(database):
    # Two managers (two connections) redeem two tokens of one exclusive VM at once. The
    # first holds its transaction open after its check; without the VM row lock the
    # second would check meanwhile, see no live console, and both would open.
    config, run = database
    now = time.time()
    run(setup_vm, "exclusive", now)
    for _ in range(3):
        a, b = run(issue, now), run(issue, now)
        assert race(config, a[0], b[0], now) == {"a": (None, []), "b": ("console_in_use", [])}
        run(_end, a[1], now)  # the next round starts with no live console


def test_takeover_is_atomic_when_two_redemptions_race(database):
    # Both take over the old console; the second also takes over the first.
    config, run = database
    now = time.time()
    run(setup_vm, "takeover", now)
    old = run(issue, now)
    assert run(redeem, old[0], now) == (None, [])
    a, b = run(issue, now), run(issue, now)
    results = race(config, a[0], b[0], now)
    assert results == {"a": (None, [old[1]]), "b": (None, sorted([old[1], a[1]]))}
