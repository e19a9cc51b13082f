"""Tokens across manager restarts (SQLite).

Redemptions commit without waiting for the disk, so a power cut can forget the last ones.
A start that finds no clean-stop marker therefore voids every pending token; a clean stop
leaves the marker and pending tokens keep working.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted

from cpvm.manager.db import CLEAN_STOP_SUFFIX


async def _two_tokens(m):
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    tokens = [(await m.endpoint(alice, vm))["websocket"]["token"] for _ in range(2)]
    return alice, key, tokens


def _marker(m) -> Path:
    return m.directory / "data" / ("manager.db" + CLEAN_STOP_SUFFIX)


@pytest_twisted.ensureDeferred
async def test_clean_stop_keeps_pending_tokens(managers):
    m = await managers("m1")
    _, key, (used, pending) = await _two_tokens(m)
    assert (await m.redeem(key, used))[0] == 200
    await m.stop()
    assert _marker(m).exists()
    m2 = await managers("m1")
    assert not _marker(m2).exists()  # consumed: a crash from now on must sweep
    assert (await m2.redeem(key, pending))[0] == 200
    status, body = await m2.redeem(key, used)
    assert (status, body["error"]) == (409, "token_used")


@pytest_twisted.ensureDeferred
async def test_start_after_unclean_stop_voids_pending_tokens(managers, log_events):
    m = await managers("m1")
    alice, key, (used, pending) = await _two_tokens(m)
    status, redeemed = await m.redeem(key, used)
    assert status == 200
    await m.stop()
    # What a crash or power cut leaves: no marker.
    _marker(m).unlink()
    m2 = await managers("m1")
    status, body = await m2.redeem(key, pending)
    assert (status, body["error"]) == (404, "invalid_token")
    status, body = await m2.redeem(key, used)
    assert (status, body["error"]) == (409, "token_used")
    status, body = await m2.api(alice, "listConsoleSessions")
    sessions = body["listconsolesessionsresponse"]["consolesession"]
    reasons = {s["id"]: s.get("endreason") for s in sessions}
    assert reasons.pop(redeemed["session_id"]) is None  # the live session is kept
    assert list(reasons.values()) == ["voided"]
    warnings = [e for e in log_events if e.get("voided") is not None]
    assert [e["voided"] for e in warnings] == [1]
