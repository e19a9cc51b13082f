"""``GET /client/console?cmd=access&vm=UUID`` (cpvm/manager/legacy_console.py) on a real
manager in the test reactor: a signed URL opens a fresh one-time console once, through a
page that redirects without script; everything else is a page that says why not."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import pytest_twisted
import treq

from cpvm.manager.legacy_console import ALREADY_USED, NEEDS_EXPIRY, NOT_ACCESS
from tests.signing import signed_query


def legacy_url(
    base: str, creds: Any, vm: str, now: float, ttl: float | None = 300, **extra: str
) -> str:
    """The signed legacy URL a tool would build: every parameter signed, as CloudStack's
    servlet checks it (no ``command``, no ``response``)."""
    query = signed_query(
        {"cmd": "access", "vm": vm, **extra},
        creds.api_key,
        creds.secret,
        expires_at=None if ttl is None else now + ttl,
    )
    return f"{base}/client/console?{urlencode(query)}"


class _Refresh(HTMLParser):
    url: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and a.get("http-equiv") == "refresh":
            self.url = a["content"].split("url=", 1)[1]


def refresh_target(page: str) -> str | None:
    p = _Refresh()
    p.feed(page)
    return p.url


async def get(url: str) -> tuple[int, str, Any]:
    response = await treq.get(url, persistent=False)
    return response.code, await response.text(), response.headers


@pytest_twisted.ensureDeferred
async def test_a_signed_url_opens_one_console_once(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key, host="cpvm.example.com", port=8443, tls=True)
    url = legacy_url(m.base, alice, vm, m.clock.seconds())
    status, page, headers = await get(url)
    assert status == 200, page
    target = refresh_target(page)
    assert target and target.startswith("https://cpvm.example.com:8443/resource/noVNC/vnc.html?")
    assert f'<a href="{target.replace("&", "&amp;")}">' in page
    assert "<script" not in page
    csp = headers.getRawHeaders("content-security-policy")[0]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    # The console it leads to is a real one-time token for this VM, redeemable once.
    path = parse_qs(urlsplit(target).query)["path"][0]
    token = parse_qs(urlsplit(path).query)["token"][0]
    m.secrets_seen.append(token)
    status, body = await m.redeem(key, token)
    assert status == 200 and body["vm"]["id"] == vm
    # The same signed URL again: refused, nothing minted.
    status, page, _ = await get(url)
    assert (status, refresh_target(page)) == (403, None)
    assert ALREADY_USED in page
    # A new signature (a new expires) works again.
    status, _, _ = await get(legacy_url(m.base, alice, vm, m.clock.seconds(), ttl=299))
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_two_requests_racing_on_one_url_get_one_console(managers):
    from twisted.internet.defer import ensureDeferred, gatherResults

    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    url = legacy_url(m.base, alice, vm, m.clock.seconds())
    results = await gatherResults([ensureDeferred(get(url)) for _ in range(5)])
    assert sorted(status for status, _, _ in results) == [200, 403, 403, 403, 403]


@pytest.mark.parametrize(
    ("change", "status", "text"),
    [
        ({"cmd": "thumbnail"}, 431, NOT_ACCESS),
        ({"vm": "not-a-uuid"}, 431, "vm must be the UUID"),
        ({"signature": "AAAA"}, 401, "unable to verify user credentials"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_say_why(managers, change, status, text):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    url = legacy_url(m.base, alice, vm, m.clock.seconds())
    split = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(split.query).items()}
    query.update(change)
    got, page, _ = await get(f"{m.base}/client/console?{urlencode(query)}")
    assert got == status and text in page


@pytest_twisted.ensureDeferred
async def test_an_expiry_is_required_even_when_the_api_makes_it_optional(managers):
    m = await managers(sections={"security": {"signature_expiry": "optional"}})
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    status, page, _ = await get(legacy_url(m.base, alice, vm, m.clock.seconds(), ttl=None))
    assert status == 401 and NEEDS_EXPIRY in page
    status, page, _ = await get(legacy_url(m.base, alice, vm, m.clock.seconds(), ttl=-5))
    assert status == 401 and "request expired" in page


@pytest_twisted.ensureDeferred
async def test_another_accounts_vm_is_refused_with_the_managers_words(managers):
    m = await managers()
    m.account("alice")
    bob = m.account("bob")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    status, page, _ = await get(legacy_url(m.base, bob, vm, m.clock.seconds()))
    assert status == 409 and "may not access" in page
    assert (
        "consoleAccess" in m.service.metrics_text() if hasattr(m.service, "metrics_text") else True
    )


@pytest_twisted.ensureDeferred
async def test_the_documented_link_opens_a_console_once(managers):
    """docs/public-api.md's sign.py, given ``cmd=access vm=…``, makes a working link."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "public-api.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {"__name__": "doc_snippet"}
    exec(snippet, namespace)
    assert "cmd=access vm=" in doc and "/client/console?$Q" in doc
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    query = namespace["signed_query"]({"cmd": "access", "vm": vm}, alice.api_key, alice.secret)
    url = f"{m.base}/client/console?{query}"
    assert (await get(url))[0] == 200
    assert (await get(url))[0] == 403


@pytest_twisted.ensureDeferred
async def test_a_form_post_works_like_the_get_and_spends_the_same_signature(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    url = legacy_url(m.base, alice, vm, m.clock.seconds())
    base, query = url.split("?", 1)
    response = await treq.post(
        base,
        data=query.encode(),
        headers={"Content-Type": ["application/x-www-form-urlencoded"]},
        persistent=False,
    )
    assert response.code == 200 and refresh_target(await response.text())
    assert (await get(url))[0] == 403
