"""The reconnect window on the manager (docs/management-api.md "Resuming"): a used token
resumes its session only for the same browser, after an unclean end, within the window.

Everything goes through the proxy API and listConsoleSessions of a real manager (SQLite)
on an injected clock.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

SAME = hashlib.sha256(b"profile A's console cookie").hexdigest()
OTHER = hashlib.sha256(b"profile B's console cookie").hexdigest()
START = 1_800_000_000


def _report(reason: str, sent: int = 100, received: int = 10, **extra) -> dict:
    return {
        "reason": reason,
        "bytes_to_client": sent,
        "bytes_to_server": received,
        "duration": 5.0,
        **extra,
    }


class Console:
    """A manager on a clock, one account, VM and proxy key, and helpers around a token."""

    def __init__(self, m, clock, alice, vm, key):
        self.m, self.clock, self.alice, self.vm, self.key = m, clock, alice, vm, key

    async def open(self, browser_hash: str | None = SAME) -> tuple[str, str]:
        """A new token, redeemed once by ``browser_hash``: (token, session id)."""
        token = (await self.m.endpoint(self.alice, self.vm))["websocket"]["token"]
        status, body = await self.redeem(token, browser_hash)
        assert status == 200, body
        assert body.get("reconnects", 0) == 0
        return token, body["session_id"]

    async def redeem(self, token, browser_hash=SAME, address="127.0.0.1", instance=None):
        body = {"token": token, "extra": None, "client_address": address}
        if browser_hash is not None:
            body["browser_hash"] = browser_hash
        return await self.m.proxy(self.key, "redeem", body)

    async def end(self, session_id: str, report: dict) -> None:
        status, body = await self.m.proxy(self.key, f"sessions/{session_id}/end", report)
        assert status == 204, body

    async def record(self, session_id: str) -> dict:
        status, body = await self.m.api(self.alice, "listConsoleSessions", id=session_id)
        assert status == 200, body
        (record,) = body["listconsolesessionsresponse"]["consolesession"]
        return record


@pytest_twisted.async_yield_fixture
async def console(managers):
    async def start(vm_options=None, **sections):
        clock = Clock()
        clock.advance(START)
        m = await managers(sections=sections, clock=clock)
        alice = m.account("alice")
        vm = m.vm("alice", **(vm_options or {}))
        key = m.proxy_key("p1")
        await m.heartbeat(key)
        return Console(m, clock, alice, vm, key)

    yield start


@pytest_twisted.ensureDeferred
async def test_the_same_browser_resumes_a_lost_session_which_keeps_its_id(console, log_events):
    c = await console(tokens={"reconnect_window": "30"})
    token, sid = await c.open()
    await c.end(sid, _report("client_lost", 100, 10))
    c.clock.advance(29)
    status, body = await c.redeem(token)
    assert status == 200, body
    assert body["session_id"] == sid and body["reconnects"] == 1
    record = await c.record(sid)
    assert record["reconnects"] == 1 and "ended" not in record and "endreason" not in record
    # Counted as its own outcome, and audited as a resume, not a second acquisition.
    metrics = await (await treq.get(c.m.base + "/metrics", persistent=False)).text()
    assert 'cpvm_manager_redemptions_total{outcome="resumed"} 1.0' in metrics
    events = [e for e in log_events if e.get("log_namespace") == "cpvm.audit"]
    assert [e["event"] for e in events if e["event"] in ("acquired", "resumed")] == [
        "acquired",
        "resumed",
    ]
    assert events[-1]["session"] == sid and events[-1]["reconnects"] == 1
    # The second connection's end adds up with the first one's.
    await c.end(sid, _report("client_closed", 50, 5, reconnects=1))
    record = await c.record(sid)
    assert record["endreason"] == "client_closed"
    assert (record["bytestoclient"], record["bytestoserver"], record["duration"]) == (150, 15, 10)
    # A clean end is final: the same browser, at once, is refused.
    status, body = await c.redeem(token)
    # As before the window existed: a clean end forgets the token.
    assert (status, body["error"]) == (404, "invalid_token")


@pytest_twisted.ensureDeferred
async def test_another_browser_or_none_is_refused_as_a_reused_token(console):
    c = await console()
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    for other in (OTHER, None):
        status, body = await c.redeem(token, other)
        assert (status, body["error"]) == (409, "token_used"), other
    # Refusals burnt nothing: the right browser still resumes.
    status, body = await c.redeem(token)
    assert status == 200 and body["session_id"] == sid


@pytest_twisted.ensureDeferred
async def test_after_the_window_even_the_same_browser_is_refused(console):
    c = await console(tokens={"reconnect_window": "10"})
    token, sid = await c.open()
    await c.end(sid, _report("shutdown"))
    c.clock.advance(10.5)
    status, body = await c.redeem(token)
    assert (status, body["error"]) == (409, "token_used")
    record = await c.record(sid)
    assert record["endreason"] == "shutdown" and record["reconnects"] == 0


@pytest.mark.parametrize("reason", ["client_closed", "idle_timeout", "max_duration", "terminated"])
@pytest_twisted.ensureDeferred
async def test_clean_ends_are_final(console, reason):
    c = await console()
    token, sid = await c.open()
    await c.end(sid, _report(reason))
    status, body = await c.redeem(token)
    # As before the window existed: a clean end forgets the token.
    assert (status, body["error"]) == (404, "invalid_token")
    assert (await c.record(sid))["endreason"] == reason


@pytest_twisted.ensureDeferred
async def test_window_zero_keeps_one_time_use_strict(console):
    c = await console(tokens={"reconnect_window": "0"})
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    status, body = await c.redeem(token)
    # As before the window existed: a clean end forgets the token.
    assert (status, body["error"]) == (404, "invalid_token")
    # Console URLs tell noVNC to retry only while resuming can work.
    answer = await c.m.endpoint(c.alice, c.vm)
    assert "reconnect=false" in answer["url"]


@pytest_twisted.ensureDeferred
async def test_console_urls_ask_novnc_to_retry_while_the_window_is_on(console):
    c = await console()
    answer = await c.m.endpoint(c.alice, c.vm)
    assert "reconnect=true" in answer["url"] and "reconnect=false" not in answer["url"]


@pytest_twisted.ensureDeferred
async def test_a_live_or_terminated_session_is_not_resumed(console):
    c = await console()
    token, sid = await c.open()
    status, body = await c.redeem(token)  # still live: a second browser tab, a copy
    assert (status, body["error"]) == (409, "token_used")
    status, body = await c.m.api(c.alice, "endConsoleSession", id=sid)
    assert status == 200, body
    # The proxy closes it for the termination; even if the browser's end looked unclean,
    # an administrator's end is final.
    await c.end(sid, _report("client_lost"))
    status, body = await c.redeem(token)
    assert (status, body["error"]) == (409, "token_used")


@pytest_twisted.ensureDeferred
async def test_a_late_report_of_an_earlier_connection_does_not_end_the_resumed_one(console):
    c = await console()
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    status, body = await c.redeem(token)
    assert status == 200 and body["reconnects"] == 1
    # The first connection's report again (a retry of a lost delivery): ignored.
    await c.end(sid, _report("client_lost", reconnects=0))
    record = await c.record(sid)
    assert "ended" not in record and record["reconnects"] == 1
    # Reported by the same worker's heartbeat right after the resume: not reconciled away.
    await c.m.heartbeat(c.key, active=[])
    assert "ended" not in await c.record(sid)


@pytest_twisted.ensureDeferred
async def test_a_session_lost_with_its_proxy_can_be_resumed(console):
    c = await console(proxies={"proxy_timeout": "20"})
    token, sid = await c.open()
    c.clock.advance(25)
    await c.m.heartbeat(c.key, active=[])  # a restarted process: the session is gone
    assert (await c.record(sid))["endreason"] == "proxy_lost"
    status, body = await c.redeem(token)
    assert status == 200 and body["session_id"] == sid and body["reconnects"] == 1


@pytest_twisted.ensureDeferred
async def test_the_time_limit_counts_from_the_first_redemption(console):
    c = await console(sessions={"max_duration": "100"})
    token, sid = await c.open()
    c.clock.advance(60)
    await c.end(sid, _report("client_lost"))
    c.clock.advance(10)
    status, body = await c.redeem(token)
    assert status == 200 and body["limits"]["max_duration"] == pytest.approx(30)


@pytest_twisted.ensureDeferred
async def test_with_address_binding_the_address_must_match_too(console):
    c = await console(tokens={"bind_client_address": "true"})
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    status, body = await c.redeem(token, address="198.51.100.4")
    assert status == 403 and body["error"] == "address_mismatch"
    status, body = await c.redeem(token)
    assert status == 200 and body["session_id"] == sid


@pytest_twisted.ensureDeferred
async def test_a_malformed_browser_hash_is_a_bad_request(console):
    c = await console()
    token = (await c.m.endpoint(c.alice, c.vm))["websocket"]["token"]
    for bad in ("abc", 5, "g" * 64, SAME + "0"):
        status, body = await c.m.proxy(
            c.key, "redeem", {"token": token, "client_address": "1.2.3.4", "browser_hash": bad}
        )
        assert (status, body["error"]) == (400, "bad_request"), bad
    status, _ = await c.redeem(token)
    assert status == 200  # nothing was burnt


@pytest_twisted.ensureDeferred
async def test_cleanup_forgets_the_token_once_the_window_has_passed(console):
    c = await console(tokens={"reconnect_window": "10"})
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    c.clock.advance(11)
    await c.m.service.broker.cleanup()
    status, body = await c.redeem(token)
    assert (status, body["error"]) == (404, "invalid_token")
    assert (await c.record(sid))["endreason"] == "client_lost"


@pytest_twisted.ensureDeferred
async def test_a_resume_keeps_to_the_vms_exclusive_viewer_policy(console):
    c = await console(vm_options={"viewer_policy": "exclusive"})
    token, sid = await c.open()
    await c.end(sid, _report("client_lost"))
    # Meanwhile someone else opened the VM's console: the resume is refused, not spent.
    other_token, other_sid = await c.open(OTHER)
    status, body = await c.redeem(token)
    assert (status, body["error"]) == (409, "console_in_use")
    await c.end(other_sid, _report("client_closed"))
    status, body = await c.redeem(token)
    assert status == 200 and body["session_id"] == sid and body["reconnects"] == 1
    assert body["viewer_policy"] == "exclusive"
