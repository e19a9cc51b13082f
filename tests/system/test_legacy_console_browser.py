"""The pre-4.18 console URL in Chromium: a signed ``/client/console?cmd=access`` on the
real manager sends the browser on to noVNC on a real cpvm, which reaches a real Xvnc;
the same URL a second time is refused."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import threads

from cpvm.manager.legacy_console import ALREADY_USED
from tests.integration.test_browser import CONNECTED, RECORD_VIOLATIONS
from tests.manager.harness import Credentials
from tests.manager.test_legacy_console import legacy_url
from tests.peers import XVNC_TEST_PASSWORD, launch_chromium
from tests.system.test_probe import _vm, system  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser


def open_twice(url: str) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            page.add_init_script(RECORD_VIOLATIONS)
            first = page.goto(url)
            page.wait_for_function(CONNECTED, timeout=30_000)
            seen = {
                "first_status": first.status if first else None,
                "status": page.inner_text("#noVNC_status"),
                "landed": page.url,
                "violations": page.evaluate("window.__violations"),
            }
            again = browser.new_page()
            second = again.goto(url)
            seen["second_status"] = second.status if second else None
            seen["second_text"] = again.inner_text("body")
            seen["second_landed"] = again.url
            return seen
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_chromium_follows_a_signed_legacy_url_to_a_connected_console(system, xvnc):  # noqa: F811
    m, cpvm, credentials = system
    vm = _vm(m, xvnc.port, XVNC_TEST_PASSWORD)
    data = json.loads(credentials.read_text())
    creds = Credentials("probe", data["apikey"], data["secretkey"])
    url = legacy_url(m.base, creds, vm, m.clock.seconds())
    seen = await threads.deferToThread(open_twice, url)
    assert seen["first_status"] == 200
    assert seen["status"].startswith("Connected") and "canary" in seen["status"], seen
    assert seen["landed"].startswith(f"http://127.0.0.1:{cpvm.port}/resource/noVNC/vnc.html?")
    assert seen["violations"] == []
    assert seen["second_status"] == 403 and ALREADY_USED in seen["second_text"], seen
    assert seen["second_landed"] == url  # no redirect the second time
