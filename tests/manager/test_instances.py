"""One proxy key, one running cpvm instance (cpvm/manager/instances.py).

The rule as a pure function with explicit times, then the real manager service: a second
instance's heartbeats and redemptions are refused (409 instance_conflict), change nothing,
are counted and shown by ``proxy list``; the first takes over only after it fell silent.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from cpvm.manager.instances import decide

A = "a" * 32
B = "b" * 32
T = 1_800_000_000.0
TIMEOUT = 20.0


@pytest.mark.parametrize(
    "bound, seen, caller, now, accepted, bind, takeover",
    [
        (None, None, A, T, True, True, False),  # first use binds
        (A, T, A, T + 1, True, True, False),  # the bound instance: renewed
        (A, T, A, T + 10_000, True, True, False),  # its restart after long: at once
        (A, T, B, T + 1, False, False, False),  # another, while A is live: refused
        (A, T, B, T + TIMEOUT, False, False, False),  # the timeout itself is still live
        (A, T, B, T + TIMEOUT + 0.001, True, True, True),  # A silent past the timeout: B takes
        (A, None, B, T, True, True, True),  # bound but never seen: not live
        (A, T, None, T + 1, False, False, False),  # no id sent while A is live: refused
        (A, T, None, T + TIMEOUT + 1, True, False, False),  # no id, A gone: served, binds nothing
        (None, None, None, T, True, False, False),  # an older cpvm alone: as before
    ],
)
def test_binding_rule(bound, seen, caller, now, accepted, bind, takeover):
    d = decide(bound, seen, caller, now, TIMEOUT)
    assert (d.accepted, d.bind, d.takeover) == (accepted, bind, takeover)


def _proxy_row(m, name: str) -> dict:
    rows = json.loads(m.admin("--json", "proxy", "list"))
    return next(r for r in rows if r["name"] == name)


async def _metric(m, text: str) -> bool:
    r = await treq.get(m.base + "/metrics", persistent=False)
    return text in await r.text()


@pytest_twisted.ensureDeferred
async def test_second_instance_is_refused_until_the_first_falls_silent(managers, log_events):
    clock = Clock()
    clock.advance(T)
    m = await managers(sections={"proxies": {"proxy_timeout": str(TIMEOUT)}}, clock=clock)
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key, host="one.example", port=57345, instance=A)

    clock.advance(1)
    body = await m.heartbeat(key, host="two.example", port=18443, tls=True, instance=B, expect=409)
    assert body["error"] == "instance_conflict"
    assert "another running cpvm instance" in body["message"]
    # Nothing of B's beat was recorded: the endpoint stays A's.
    row = _proxy_row(m, "p1")
    assert row["endpoint"] == "ws://one.example:57345"
    assert row["instance"] == A and row["instance_from"] == "127.0.0.1"
    assert row["refused_instance"] == B and row["refused_from"] == "127.0.0.1"
    assert row["refused_at"] != "-"
    answer = await m.endpoint(alice, vm)
    assert answer["websocket"]["host"] == "one.example"
    token = answer["websocket"]["token"]

    # B cannot redeem A's token, and trying does not use it up.
    status, body = await m.redeem(key, token, instance=B)
    assert (status, body["error"]) == (409, "instance_conflict")
    # Nor can a caller that sends no instance id at all.
    status, body = await m.redeem(key, token)
    assert (status, body["error"]) == (409, "instance_conflict")
    status, body = await m.redeem(key, token, instance=A)
    assert status == 200, body

    assert await _metric(m, 'cpvm_manager_instance_conflicts_total{endpoint="heartbeat"} 1.0')
    assert await _metric(m, 'cpvm_manager_instance_conflicts_total{endpoint="redeem"} 2.0')
    logged = [
        e
        for e in log_events
        if e.get("endpoint") == "heartbeat" and "refused" in e.get("log_format", "")
    ]
    assert logged and logged[0]["instance"] == B and logged[0]["bound"] == A
    assert key.split(".", 1)[1] not in repr(log_events)  # never the key's secret

    # A keeps beating: B stays refused, also right at the timeout.
    clock.advance(TIMEOUT - 1)
    await m.heartbeat(key, host="one.example", port=57345, instance=A)
    clock.advance(TIMEOUT)
    await m.heartbeat(key, host="two.example", instance=B, expect=409)
    # A silent for longer than proxy_timeout: B takes over, and A is now the stranger.
    clock.advance(0.5)
    await m.heartbeat(key, host="two.example", port=18443, tls=True, instance=B)
    row = _proxy_row(m, "p1")
    assert row["endpoint"] == "wss://two.example:18443" and row["instance"] == B
    took = [e for e in log_events if "took the key" in e.get("log_format", "")]
    assert [(e["instance"], e["bound"]) for e in took] == [(B, A)]
    await m.heartbeat(key, host="one.example", port=57345, instance=A, expect=409)
    assert _proxy_row(m, "p1")["refused_instance"] == A
    # A redemption never takes a key over (the heartbeat does, and logs it): C, while B
    # is silent, is served but B stays bound until C heartbeats.
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    clock.advance(TIMEOUT + 1)
    status, _ = await m.redeem(key, token, instance="c" * 32)
    assert status == 200
    assert _proxy_row(m, "p1")["instance"] == B


@pytest_twisted.ensureDeferred
async def test_restart_of_the_bound_instance_is_accepted_at_once(managers):
    clock = Clock()
    clock.advance(T)
    m = await managers(clock=clock)
    key = m.proxy_key("p1")
    await m.heartbeat(key, instance=A)
    clock.advance(0.1)  # a crash and a restart: same id, new process, no wait
    await m.heartbeat(key, instance=A)
    assert _proxy_row(m, "p1")["refused_instance"] is None


@pytest_twisted.ensureDeferred
async def test_instance_id_is_validated(managers):
    m = await managers()
    key = m.proxy_key("p1")
    for bad in (7, "", "x" * 65, "a b", "é"):
        status, body = await m.proxy(
            key,
            "heartbeat",
            {"public_host": "h", "public_port": 1, "tls": False, "capacity": 1, "instance": bad},
        )
        assert (status, body["error"]) == (400, "bad_request"), bad
    # Without the key's say-so nobody learns about instances: 401 first.
    status, _ = await m.proxy("cpvmk_x.y", "heartbeat", {"instance": 7})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_two_instances_racing_for_a_fresh_key_on_postgres(managers, postgres, tmp_path):
    """Two managers on one PostgreSQL, both instances beating at once on a key bound to
    nobody yet: exactly one instance wins (the binding row is locked), the other is
    refused every time."""
    from twisted.internet.defer import Deferred, gatherResults

    from tests.manager.test_postgres import _pg_sections

    _, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    keys = [m1.proxy_key(f"p{n}") for n in range(12)]

    async def beat(m, key, instance):
        status, _ = await m.proxy(
            key,
            "heartbeat",
            {
                "public_host": "h",
                "public_port": 8080,
                "tls": False,
                "capacity": 1,
                "instance": instance,
            },
        )
        return instance, status

    for n, key in enumerate(keys):
        results = await gatherResults(
            [
                Deferred.fromCoroutine(beat((m1, m2)[i % 2], key, (A, B)[(i // 2) % 2]))
                for i in range(8)
            ]
        )
        winners = {i for i, status in results if status == 200}
        assert len(winners) == 1, results
        assert all(status == 409 for i, status in results if i not in winners)
        assert _proxy_row(m1, f"p{n}")["instance"] in winners


def test_every_redemption_error_reaches_the_browser_with_its_code():
    """The contract both sides share: each error the manager can answer a redemption with
    is one cpvm maps to a close code (instance_conflict to 4008)."""
    from cpvm.common.contract import REDEMPTION_ERRORS, Outcome
    from cpvm.manager.proxy_broker import REDEEM_MESSAGE, REDEEM_STATUS

    errors = {e for e in REDEEM_STATUS if e is not None}
    assert errors <= set(REDEMPTION_ERRORS) and errors == set(REDEEM_MESSAGE)
    assert REDEEM_STATUS["instance_conflict"] == 409
    assert REDEMPTION_ERRORS["instance_conflict"] is Outcome.INSTANCE_CONFLICT
    assert Outcome.INSTANCE_CONFLICT.code == 4008


@pytest_twisted.ensureDeferred
async def test_two_instances_redeeming_on_a_fresh_key_on_postgres(managers, postgres, tmp_path):
    """Redemptions lock nothing, yet only one instance binds a fresh key: the others are
    refused and their tokens stay unused."""
    from twisted.internet.defer import Deferred, gatherResults

    from tests.manager.test_postgres import _pg_sections

    _, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    alice = m1.account("alice")
    vm = m1.vm("alice")
    for n in range(6):
        key = m1.proxy_key(f"p{n}")
        await m1.heartbeat(key)  # an older cpvm's beat: live, bound to nobody
        tokens = [(await m1.endpoint(alice, vm))["websocket"]["token"] for _ in range(8)]

        async def redeem(i, token, key=key):
            status, body = await (m1, m2)[i % 2].redeem(key, token, instance=(A, B)[i % 2])
            return (A, B)[i % 2], status, body

        results = await gatherResults(
            [Deferred.fromCoroutine(redeem(i, t)) for i, t in enumerate(tokens)]
        )
        winners = {who for who, status, _ in results if status == 200}
        assert len(winners) == 1, results
        losers = [(status, body["error"]) for who, status, body in results if who not in winners]
        assert losers == [(409, "instance_conflict")] * 4
        assert _proxy_row(m1, f"p{n}")["instance"] in winners
        m1.admin("proxy-key", "revoke", f"p{n}")  # the next tokens go to the next key
