"""The reconnect window end to end: noVNC in Chromium, a TCP relay that cuts the
connection under it, a real cpvm process, the real manager, Xvnc.

The manager runs in the test's reactor (tests/manager/harness.py) with a 15 s window;
cpvm is its own process and tells the manager the relay's port as its public one, so the
console URL the manager answers leads Chromium through the relay. Playwright's sync API
runs in one worker thread; it reaches the manager and the relay through the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.manager.harness import start_manager
from tests.peers import HOST, XVNC_TEST_PASSWORD, launch_chromium
from tests.relay import CuttableRelay

pytestmark = pytest.mark.browser

WINDOW = 15.0
CONNECTED = "() => document.documentElement.classList.contains('noVNC_connected')"
NOT_CONNECTED = "() => !document.documentElement.classList.contains('noVNC_connected')"
# The refusal noVNC shows; it stays in the status element once shown (noVNC does not retry
# after a refused connection).
REFUSED = (
    "() => { const t = document.querySelector('#noVNC_status').textContent;"
    " return t.startsWith('New connection has been rejected') ? t : false; }"
)
# What the page shows: noVNC's state classes and its status line.
STATUS = (
    "() => [document.documentElement.className,"
    " document.querySelector('#noVNC_status').textContent]"
)
# What a person does in noVNC's settings panel: the automatic reconnect and its delay.
SET_RECONNECT = """([on, delay]) => {
    const box = document.getElementById('noVNC_setting_reconnect');
    box.checked = on;
    box.dispatchEvent(new Event('change'));
    const ms = document.getElementById('noVNC_setting_reconnect_delay');
    ms.value = String(delay);
    ms.dispatchEvent(new Event('change'));
}"""


@pytest_twisted.async_yield_fixture
async def system(tmp_path, xvnc):
    """The manager (window 15 s), an account with the Xvnc desktop as its VM, the relay,
    and cpvm behind it."""
    m = await start_manager(
        tmp_path / "manager",
        {
            "tokens": {"reconnect_window": str(WINDOW)},
            "proxies": {"heartbeat_interval": "1", "proxy_timeout": "5"},
            # The test looks at the token's refusal, not at the cleanup forgetting it.
            "sessions": {"cleanup_interval": "3600"},
        },
    )
    relay = CuttableRelay(HOST, 1)  # its target is cpvm, once cpvm listens
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        m.secrets_seen.append(key_file.read_text().strip())
        text = cpvm_config(m.base, credential_file=key_file, server={"public_port": relay.port})
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path)
        relay.retarget(HOST, cpvm.port)
        alice = m.account("alice")
        vm = m.vm(
            "alice",
            name="xvnc-desktop",
            password=XVNC_TEST_PASSWORD,
            vnc_host=HOST,
            vnc_port=str(xvnc.port),
        )
        deadline = time.monotonic() + 20
        while True:
            answer = await m.endpoint(alice, vm)
            if answer["success"]:
                break
            assert time.monotonic() < deadline, cpvm.log_text()[-2000:]
            await deferLater(reactor, 0.2)
        yield {"m": m, "alice": alice, "relay": relay, "cpvm": cpvm, "answer": answer}
    finally:
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        await relay.stop()
        await m.stop()


class Remote:
    """What the browser thread needs from the reactor: session records and the cut."""

    def __init__(self, system: dict):
        self._m, self._alice, self._relay = system["m"], system["alice"], system["relay"]

    def _call(self, fn: Callable[[], Any]) -> Any:
        return threads.blockingCallFromThread(reactor, fn)

    def session(self) -> dict:
        async def listing() -> dict:
            status, body = await self._m.api(self._alice, "listConsoleSessions")
            assert status == 200, body
            (record,) = body["listconsolesessionsresponse"]["consolesession"]
            return record

        return self._call(lambda: Deferred.fromCoroutine(listing()))

    def cut(self) -> int:
        return self._relay.cut_from_thread()

    def wait_for(self, check: Callable[[dict], bool], what: str, seconds: float = 30) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            record = self.session()
            if check(record):
                return record
            assert time.monotonic() < deadline, f"{what}: {record}"
            time.sleep(0.1)


def _lost(record: dict) -> bool:
    return record.get("endreason") == "client_lost"


def cut_resume_refuse(url: str, remote: Remote) -> dict:
    """The whole story in one browser process; returns what each step saw. A failing step
    is named, with what the first browser's page and the session record said then."""
    from playwright.sync_api import sync_playwright

    seen: dict = {}
    with sync_playwright() as p:
        browser = launch_chromium(p)
        a = None
        try:
            a = browser.new_context().new_page()
            _story(a, browser, url, remote, seen)
        except Exception as e:
            status = a.evaluate(STATUS) if a is not None else None
            raise AssertionError(
                f"after {sorted(seen)}: {e!r}; page: {status}; session: {remote.session()}"
            ) from e
        finally:
            browser.close()
    return seen


def _story(a, browser, url: str, remote: Remote, seen: dict) -> None:
    """The steps, each recording what it saw in ``seen``."""
    a.goto(url)
    a.wait_for_function(CONNECTED, timeout=30_000)
    first = remote.session()
    seen["first"] = first
    # 1. The connection is cut under the browser: noVNC reconnects by itself
    #    (reconnect=true in the manager's URL, 5 s later) and the session resumes.
    assert remote.cut() >= 1
    a.wait_for_function(NOT_CONNECTED, timeout=10_000)
    seen["resumed"] = remote.wait_for(
        lambda r: r.get("reconnects") == 1 and "ended" not in r, "no resume"
    )
    a.wait_for_function(CONNECTED, timeout=30_000)
    # 2. Cut again, with automatic reconnect off: another profile with the very
    #    same URL, within the window, is refused.
    a.evaluate(SET_RECONNECT, [False, 5000])
    remote.cut()
    seen["lost"] = remote.wait_for(_lost, "the unclean end never reached the manager")
    other = browser.new_context()
    b = other.new_page()
    b.goto(url)
    seen["other_profile"] = b.wait_for_function(REFUSED, timeout=30_000).json_value()
    other.close()
    seen["after_other"] = remote.session()
    # 3. The first browser, still within the window (a person clicks Connect).
    a.click("#noVNC_connect_button")
    a.wait_for_function(CONNECTED, timeout=30_000)
    seen["resumed_again"] = remote.session()
    # 4. Cut once more; this time noVNC retries only after the window has passed.
    a.evaluate(SET_RECONNECT, [True, int((WINDOW + 3) * 1000)])
    cut_at = time.monotonic()
    remote.cut()
    seen["lost_again"] = remote.wait_for(_lost, "the second unclean end")
    seen["too_late"] = a.wait_for_function(REFUSED, timeout=int((WINDOW + 30) * 1000)).json_value()
    seen["waited"] = time.monotonic() - cut_at
    seen["final"] = remote.session()


@pytest_twisted.ensureDeferred
async def test_a_cut_connection_resumes_for_the_same_browser_only_and_only_in_the_window(
    system,
):
    url = system["answer"]["url"]
    assert "reconnect=true" in url and f":{system['relay'].port}/" in url
    seen = await threads.deferToThread(cut_resume_refuse, url, Remote(system))
    sid = seen["first"]["id"]
    assert seen["first"]["reconnects"] == 0 and "ended" not in seen["first"]
    # Resumed by itself: the same session, counted.
    assert seen["resumed"]["id"] == sid and seen["resumed"]["reconnects"] == 1
    # Another profile, same URL, within the window: refused as a reused token, and the
    # session is untouched (still resumable by its own browser, which then does).
    assert seen["lost"]["id"] == sid
    assert seen["other_profile"] == (
        "New connection has been rejected with reason: token already used"
    )
    assert seen["after_other"]["reconnects"] == 1 and _lost(seen["after_other"])
    assert seen["resumed_again"]["id"] == sid and seen["resumed_again"]["reconnects"] == 2
    assert "ended" not in seen["resumed_again"]
    # After the window even the first browser is refused; the record keeps its end.
    assert seen["too_late"] == "New connection has been rejected with reason: token already used"
    assert seen["waited"] >= WINDOW
    final = seen["final"]
    assert final["id"] == sid and final["reconnects"] == 2 and _lost(final)
    # Three connections' bytes add up in the one record.
    assert final["bytestoclient"] > seen["resumed"].get("bytestoclient", 0)
