"""Proxy API bodies the fuzzer (tests/fuzz, target proxy_bodies) found mishandled.

Against a real manager over HTTP: a deeply nested body was a 500 with a traceback in the
log; an end report's ``duration`` of NaN, Infinity (or 1e999) was stored and came back as
invalid JSON in listConsoleSessions, and a huge integer duration was a 500.
"""

from __future__ import annotations

import json
import math

import pytest
import pytest_twisted
import treq

from tests.fuzz import targets


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


async def _post(m, key: str, path: str, raw: bytes) -> tuple[int, dict]:
    response = await treq.post(
        f"{m.base}/proxy/v1/{path}",
        data=raw,
        persistent=False,
        headers={"Content-Type": ["application/json"], "Authorization": [f"Bearer {key}"]},
    )
    return response.code, _strict_json(await response.text())


@pytest_twisted.ensureDeferred
async def test_deeply_nested_body_is_a_400_not_a_500(managers, log_events):
    m = await managers()
    key = m.proxy_key("p1")
    status, body = await _post(m, key, "heartbeat", b"[" * 200_000)
    assert (status, body["error"]) == (400, "bad_request"), body
    assert not [e for e in log_events if e.get("log_failure") is not None]
    await m.heartbeat(key)  # and the manager goes on serving


END = '{"reason": "client_closed", "bytes_to_client": 1, "bytes_to_server": 2, "duration": %s}'


@pytest.mark.parametrize(
    "duration",
    ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400],
    ids=["NaN", "Infinity", "-Infinity", "1e999", "10**400"],
)
@pytest_twisted.ensureDeferred
async def test_end_report_duration_must_be_a_finite_number(managers, duration):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    status, redeemed = await m.redeem(key, token)
    assert status == 200, redeemed
    session = redeemed["session_id"]
    status, body = await _post(m, key, f"sessions/{session}/end", (END % duration).encode())
    assert (status, body["error"]) == (400, "bad_request"), body
    beat = (
        '{"public_host": "h", "public_port": 1, "tls": false, "capacity": 1, "ended": '
        f'[{(END % duration)[:-1]}, "session_id": "{session}"}}]}}'
    )
    # In a heartbeat the bad report is dropped (logged), the heartbeat itself answered.
    status, body = await _post(m, key, "heartbeat", beat.encode())
    assert status == 200 and body["terminate"] == [], body
    # What the dashboard reads holds no NaN/Infinity (which JSON cannot carry).
    status, listing = await m.api(alice, "listConsoleSessions")
    assert status == 200
    [record] = listing["listconsolesessionsresponse"]["consolesession"]
    assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values()), record


def test_fuzz_regression_vectors_are_committed():
    names = {p.name for p in targets.corpus_files("proxy_bodies")}
    assert {
        "regress-deep-nesting",
        "regress-nan-duration",
        "regress-huge-duration",
        "regress-overflow-float-duration",
    } <= names
