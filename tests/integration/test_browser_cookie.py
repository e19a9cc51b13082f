"""The console cookie in Chromium: set by cpvm on the WebSocket upgrade, sent back by the
same profile with every later upgrade, never by another profile, invisible to scripts.

What the manager receives is its hash, with the redemption (the contract manager records
every redemption request cpvm makes).
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.test_browser import console_url
from tests.peers import launch_chromium

pytestmark = pytest.mark.browser


def _open_and_wait(page, url: str, manager, count: int) -> None:
    """Open ``url`` and wait (bounded) until cpvm has made its ``count``-th redemption."""
    page.goto(url)
    deadline = time.monotonic() + 30
    while len(manager.redeem_requests) < count:
        assert time.monotonic() < deadline, "cpvm never redeemed the token"
        time.sleep(0.05)


def visit_twice_then_from_another_profile(cpvm, manager, tokens: list[str]) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            first = browser.new_context()
            page = first.new_page()
            _open_and_wait(page, console_url(cpvm, tokens[0]), manager, 1)
            cookies = first.cookies()
            script_sees = page.evaluate("() => document.cookie")
            page = first.new_page()
            _open_and_wait(page, console_url(cpvm, tokens[1]), manager, 2)
            other = browser.new_context()
            _open_and_wait(other.new_page(), console_url(cpvm, tokens[2]), manager, 3)
            return {"cookies": cookies, "script_sees": script_sees}
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_the_cookie_set_on_the_upgrade_comes_back_from_the_same_profile_only(cpvm, manager):
    # Nothing listens on port 1: the consoles fail after their redemption, which is all
    # this test looks at.
    tokens = [manager.issue({"host": "127.0.0.1", "port": 1})[0] for _ in range(3)]
    seen = await threads.deferToThread(visit_twice_then_from_another_profile, cpvm, manager, tokens)
    (cookie,) = seen["cookies"]
    assert cookie["name"] == "cpvm_console" and cookie["path"] == "/"
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["expires"] == -1  # a session cookie: gone with the browser
    assert seen["script_sees"] == ""  # HttpOnly: the page's scripts cannot read it
    hashes = [r.get("browser_hash") for r in manager.redeem_requests]
    assert all(h and len(h) == 64 for h in hashes)
    # The same profile proves the same browser; another profile is another browser.
    assert hashes[0] == hashes[1] and hashes[2] != hashes[0]
    # The manager gets the hash, never the cookie itself.
    assert cookie["value"] not in str(manager.redeem_requests)
