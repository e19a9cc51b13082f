"""View-only consoles and viewer policies through the manager's APIs and admin CLI (a
real manager service; SQLite, and two managers on one PostgreSQL)."""

from __future__ import annotations

import itertools
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from tests.manager.test_postgres import _pg_sections

_names = itertools.count()
END = {"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 1, "duration": 1.0}


async def _setup(m, **vm_options):
    alice = m.account("alice")
    vm = m.vm("alice", **vm_options)
    key = m.proxy_key(f"p{next(_names)}")
    await m.heartbeat(key)
    return alice, vm, key


async def _open(m, alice, vm, key, **params):
    token = (await m.endpoint(alice, vm, **params))["websocket"]["token"]
    return await m.redeem(key, token)


@pytest_twisted.ensureDeferred
async def test_view_only_endpoint_url_redemption_and_listing(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    answer = await m.endpoint(alice, vm, viewonly="true")
    assert answer["websocket"]["viewonly"] is True
    query = parse_qs(urlsplit(answer["url"]).query)
    assert query["view_only"] == ["1"]
    status, body = await m.redeem(key, answer["websocket"]["token"])
    assert status == 200 and body["view_only"] is True
    status, listed = await m.api(alice, "listConsoleSessions", id=body["session_id"])
    assert listed["listconsolesessionsresponse"]["consolesession"][0]["viewonly"] is True
    # A full console says nothing of it.
    full = await m.endpoint(alice, vm)
    assert "viewonly" not in full["websocket"] and "view_only" not in full["url"]
    status, body = await m.redeem(key, full["websocket"]["token"])
    assert body["view_only"] is False
    status, body = await m.api(alice, "createConsoleEndpoint", virtualmachineid=vm, viewonly="x")
    assert status == 431 and "viewonly" in body["createconsoleendpointresponse"]["errortext"]


@pytest_twisted.ensureDeferred
async def test_exclusive_refuses_a_second_full_console_but_admits_view_only(managers):
    m = await managers()
    alice, vm, key = await _setup(m, viewer_policy="exclusive")
    status, first = await _open(m, alice, vm, key)
    assert status == 200 and first["viewer_policy"] == "exclusive"
    second = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, refused = await m.redeem(key, second)
    assert (status, refused["error"]) == (409, "console_in_use")
    status, watcher = await _open(m, alice, vm, key, viewonly="true")
    assert status == 200 and watcher["view_only"] is True
    # The refused token was not spent: it opens once the first console has ended.
    status, _ = await m.proxy(key, f"sessions/{first['session_id']}/end", END)
    assert status == 204
    status, body = await m.redeem(key, second)
    assert status == 200 and body["taken_over"] == []


@pytest_twisted.ensureDeferred
async def test_takeover_names_the_old_console_in_the_redemption_and_the_heartbeat(managers):
    m = await managers()
    alice, vm, key = await _setup(m, viewer_policy="takeover")
    _, old = await _open(m, alice, vm, key)
    _, watcher = await _open(m, alice, vm, key, viewonly="true")
    status, new = await _open(m, alice, vm, key)
    assert status == 200 and new["taken_over"] == [old["session_id"]]
    live = [old["session_id"], watcher["session_id"], new["session_id"]]
    beat = await m.heartbeat(key, active=live)
    # In both lists: a cpvm that predates takeover still ends it (as terminated).
    assert beat["terminate"] == [old["session_id"]]
    assert beat["taken_over"] == [old["session_id"]]
    report = {**END, "reason": "taken_over"}
    status, _ = await m.proxy(key, f"sessions/{old['session_id']}/end", report)
    assert status == 204
    _, listed = await m.api(alice, "listConsoleSessions", id=old["session_id"])
    assert listed["listconsolesessionsresponse"]["consolesession"][0]["endreason"] == "taken_over"
    assert (await m.heartbeat(key, active=live[1:]))["terminate"] == []


@pytest_twisted.ensureDeferred
async def test_the_manager_default_and_the_cli(managers):
    m = await managers(sections={"sessions": {"viewer_policy": "exclusive"}})
    alice, vm, key = await _setup(m)
    assert (await _open(m, alice, vm, key))[0] == 200
    assert (await _open(m, alice, vm, key))[1]["error"] == "console_in_use"
    # The VM's own policy wins over the default; "default" hands it back.
    m.admin("vm", "update", vm, "--viewer-policy", "shared")
    assert "shared" in m.admin("vm", "list")
    status, body = await _open(m, alice, vm, key)
    assert status == 200 and body["viewer_policy"] == "shared"
    m.admin("vm", "update", vm, "--viewer-policy", "default")
    assert (await _open(m, alice, vm, key))[1]["error"] == "console_in_use"


@pytest_twisted.ensureDeferred
async def test_two_managers_one_postgres_exclusive_gives_one_console(managers, postgres, tmp_path):
    _, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    alice, vm, key = await _setup(m1, viewer_policy="exclusive")
    await m2.heartbeat(key, capacity=100)  # room for every pending token
    tokens = [(await m1.endpoint(alice, vm))["websocket"]["token"] for _ in range(12)]
    watchers = [
        (await m2.endpoint(alice, vm, viewonly="true"))["websocket"]["token"] for _ in range(4)
    ]
    # Every token at once, spread over both managers.
    results = await gatherResults(
        [
            Deferred.fromCoroutine((m1, m2)[i % 2].redeem(key, token))
            for i, token in enumerate(tokens + watchers)
        ]
    )
    full, viewers = results[: len(tokens)], results[len(tokens) :]
    assert sorted(s for s, _ in full) == [200] + [409] * (len(tokens) - 1)
    assert {b["error"] for s, b in full if s == 409} == {"console_in_use"}
    assert [s for s, _ in viewers] == [200] * len(watchers)


@pytest_twisted.ensureDeferred
async def test_two_managers_one_postgres_takeover_leaves_one_console(managers, postgres, tmp_path):
    _, sections = _pg_sections(postgres, tmp_path / "kek")
    m1 = await managers("a", sections)
    m2 = await managers("b", sections)
    alice, vm, key = await _setup(m1, viewer_policy="takeover")
    await m2.heartbeat(key, capacity=100)
    tokens = [(await m1.endpoint(alice, vm))["websocket"]["token"] for _ in range(8)]
    results = await gatherResults(
        [
            Deferred.fromCoroutine((m1, m2)[i % 2].redeem(key, token))
            for i, token in enumerate(tokens)
        ]
    )
    assert [s for s, _ in results] == [200] * len(tokens)
    sessions = {b["session_id"] for _, b in results}
    taken = {old for _, b in results for old in b["taken_over"]}
    # All but one were taken over by a later one: exactly one console is left standing.
    assert len(sessions - taken) == 1 and taken <= sessions


@pytest.mark.parametrize("value", ["first", ""])
def test_the_cli_refuses_an_unknown_policy(value, tmp_path):
    from cpvm.manager.vms import VmError, parse_fields

    with pytest.raises(VmError, match="viewerpolicy"):
        parse_fields({"viewer_policy": value})
