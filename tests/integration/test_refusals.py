"""Refusals a person can read: told after the upgrade as RFB's failure reason (what noVNC
shows) and as the close code and reason; a refused Origin, which no browser may be told,
is logged with the setting to change. A real cpvm process, its contract manager."""

from __future__ import annotations

import time
import urllib.parse

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads

from cpvm.common.contract import Outcome
from tests.integration import scripted_vnc
from tests.integration.test_browser import second_visit
from tests.wsclient import RfbRefused, open_console


@pytest.fixture
def echo_server():
    port, _, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    yield port
    listening.stopListening()


async def refused_in_rfb(url: str, **kwargs) -> tuple[str, object]:
    client = await open_console(url, **kwargs)
    with pytest.raises(RfbRefused) as refused:
        await client.rfb_handshake()
    return str(refused.value), await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_missing_token_is_told_to_the_person(cpvm):
    reason, closed = await refused_in_rfb(f"ws://127.0.0.1:{cpvm.port}/websockify")
    assert reason == "bad request (missing token)"
    assert (closed.code, closed.reason) == (4400, "bad request (missing token)")
    reason, _ = await refused_in_rfb(f"ws://127.0.0.1:{cpvm.port}/websockify?token=a&token=b")
    assert reason == "bad request (missing token)"


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_speaks_rfb_still_gets_the_close_reason(cpvm):
    client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?extra=x")
    started = time.monotonic()
    closed = await client.wait_closed()
    assert (closed.code, closed.reason) == (4400, "bad request (missing token)")
    assert 1.5 < time.monotonic() - started < 6  # the grace for the RFB version, no more


@pytest_twisted.ensureDeferred
async def test_a_full_proxy_is_told_to_the_person(cpvm_factory, manager, echo_server):
    cpvm = cpvm_factory(session={"max_sessions": 1})
    token, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    first = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
    await first.rfb_handshake()
    second, _ = manager.issue({"host": "127.0.0.1", "port": echo_server})
    reason, closed = await refused_in_rfb(f"ws://127.0.0.1:{cpvm.port}/websockify?token={second}")
    assert reason == Outcome.AT_CAPACITY.text == "console proxy at capacity: try again in a moment"
    assert (closed.code, closed.reason) == (4503, reason)
    # Told, not redeemed: the second token is still unused at the manager.
    assert not manager.tokens[second].used
    assert "console proxy at capacity ([session] max_sessions)" in cpvm.log_text()
    first.sendClose(1000)
    await first.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_refused_origin_is_logged_with_the_setting_to_change(cpvm):
    with pytest.raises(ConnectionError, match="403"):
        await open_console(
            f"ws://127.0.0.1:{cpvm.port}/websockify?token=abc", origin="https://dash.example"
        )
    expected = (
        "refused WebSocket from 127.0.0.1: origin 'https://dash.example' is not allowed: to let"
        " that page open consoles, add it to [server] allowed_origins in cpvm.conf (now: self)"
    )
    deadline = time.monotonic() + 5
    while expected not in cpvm.log_text():
        assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
        await task.deferLater(reactor, 0.1, lambda: None)


@pytest.mark.browser
@pytest_twisted.ensureDeferred
async def test_novnc_shows_why_a_console_url_without_token_is_refused(cpvm):
    # The mistake this is for: a console URL whose noVNC ``path`` lost its token.
    path = urllib.parse.quote("websockify", safe="")
    url = (
        f"http://127.0.0.1:{cpvm.port}/resource/noVNC/vnc.html?autoconnect=true"
        f"&reconnect=false&host=127.0.0.1&port={cpvm.port}&path={path}"
    )
    status = await threads.deferToThread(second_visit, url)
    assert status == "New connection has been rejected with reason: bad request (missing token)"
