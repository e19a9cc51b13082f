"""The CloudStack-style public API: signatures, envelopes, createConsoleEndpoint."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import pytest_twisted
from twisted.internet.task import Clock

from cpvm.manager import signing
from tests.signing import signed_query


def _error(body, command):
    return body[f"{command.lower()}response"]


@pytest_twisted.ensureDeferred
async def test_signature_valid_get_and_post(managers):
    m = await managers()
    alice = m.account("alice")
    for method in ("GET", "POST"):
        status, body = await m.api(alice, "listConsoleSessions", method=method)
        assert status == 200, body
        assert body == {"listconsolesessionsresponse": {"count": 0, "consolesession": []}}


@pytest_twisted.ensureDeferred
async def test_signature_failures_use_cloudstack_envelope(managers):
    m = await managers()
    alice = m.account("alice")
    wrong = type(alice)("alice", alice.api_key, "not-the-secret")
    status, body = await m.api(wrong, "listConsoleSessions")
    assert status == 401
    signing_failed = "unable to verify user credentials and/or request signature"
    assert body == {
        "listconsolesessionsresponse": {
            "uuidList": [],
            "errorcode": 401,
            "cserrorcode": 9999,
            "errortext": signing_failed,
        }
    }
    # tampered parameter: signed for one VM id, sent with another
    params = signed_query(
        {"command": "listConsoleSessions", "response": "json", "activeonly": "true"},
        alice.api_key,
        alice.secret,
        expires_at=m.clock.seconds() + 60,
    )
    sig, expires = params["signature"], params["expires"]
    status, body = await m.api(
        None,
        "listConsoleSessions",
        apiKey=alice.api_key,
        activeonly="false",
        signature=sig,
        signatureVersion="3",
        expires=expires,
    )
    assert status == 401
    assert _error(body, "listConsoleSessions")["errortext"] == signing_failed
    # missing signature / missing apiKey
    status, body = await m.api(None, "listConsoleSessions", apiKey=alice.api_key)
    assert status == 401 and _error(body, "listConsoleSessions")["errorcode"] == 401
    status, body = await m.api(None, "listConsoleSessions")
    assert status == 401
    # unknown apiKey
    status, _ = await m.api(type(alice)("x", "no-such-key", alice.secret), "listConsoleSessions")
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_signature_version_3_expires(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(clock=clock)
    alice = m.account("alice")
    future = signing.format_time(clock.seconds() + 60)
    past = signing.format_time(clock.seconds() - 1)
    status, body = await m.api(alice, "listConsoleSessions", signatureVersion="3", expires=future)
    assert status == 200, body
    status, body = await m.api(alice, "listConsoleSessions", signatureVersion="3", expires=past)
    assert status == 401
    assert "expired" in _error(body, "listConsoleSessions")["errortext"]
    status, body = await m.api(alice, "listConsoleSessions", signatureVersion="3")
    assert status == 401
    assert _error(body, "listConsoleSessions")["errortext"] == "signatureVersion=3 requires expires"
    # Z suffix accepted as well
    status, body = await m.api(
        alice, "listConsoleSessions", signatureVersion="3", expires=future.replace("+0000", "Z")
    )
    assert status == 200, body


@pytest_twisted.ensureDeferred
async def test_unknown_command_xml_and_missing_parameter(managers):
    m = await managers()
    alice = m.account("alice")
    status, body = await m.api(alice, "deployVirtualMachine")
    assert status == 432
    assert body["deployvirtualmachineresponse"]["errorcode"] == 432
    status, body = await m.api(alice, "listConsoleSessions", response="xml")
    assert status == 431
    assert "json" in body["listconsolesessionsresponse"]["errortext"]
    status, body = await m.api(alice, "createConsoleEndpoint")
    assert status == 431
    assert "virtualmachineid" in body["createconsoleendpointresponse"]["errortext"]
    status, body = await m.api(alice, "createConsoleEndpoint", virtualmachineid="nope")
    assert status == 431


@pytest_twisted.ensureDeferred
async def test_create_console_endpoint_shape_ws(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key, host="cpvm.example.com", port=8080, tls=False)
    status, body = await m.api(
        alice, "createConsoleEndpoint", virtualmachineid=vm, token="my extra/1"
    )
    assert status == 200
    answer = body["createconsoleendpointresponse"]["consoleendpoint"]
    assert set(answer) == {"success", "result", "url", "websocket"}
    assert answer["success"] is True and answer["result"] is True
    ws = answer["websocket"]
    token = ws["token"]
    assert ws == {
        "host": "cpvm.example.com",
        "port": "8080",
        "path": "websockify",
        "token": token,
        "extra": "my extra/1",
    }
    assert len(token) >= 43  # 32 random bytes, base64url
    url = urlsplit(answer["url"])
    assert (url.scheme, url.netloc, url.path) == (
        "http",
        "cpvm.example.com:8080",
        "/resource/noVNC/vnc.html",
    )
    q = parse_qs(url.query)
    assert q["autoconnect"] == ["true"] and q["reconnect"] == ["false"]
    assert q["host"] == ["cpvm.example.com"] and q["port"] == ["8080"]
    assert q["encrypt"] == ["0"] and q["show_dot"] == ["true"]
    path = q["path"][0]
    assert path.startswith("websockify?")
    inner = parse_qs(urlsplit(path).query)
    assert inner == {"token": [token], "extra": ["my extra/1"]}
    # noVNC decodes the path once; cpvm URL-decodes the query: the raw path keeps the
    # extra encoded so "&" or "/" in it can't break the query.
    assert "my%20extra%2F1" in unquote(answer["url"].split("&path=")[1].split("&")[0])


@pytest_twisted.ensureDeferred
async def test_create_console_endpoint_wss_and_no_extra(managers):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key, host="console.example.net", port=8443, tls=True)
    answer = await m.endpoint(alice, vm)
    assert answer["websocket"]["port"] == "8443"
    assert "extra" not in answer["websocket"]
    assert answer["url"].startswith("https://console.example.net:8443/resource/noVNC/vnc.html?")
    q = parse_qs(urlsplit(answer["url"]).query)
    assert q["encrypt"] == ["1"]
    assert q["path"] == [f"websockify?token={answer['websocket']['token']}"]


@pytest_twisted.ensureDeferred
async def test_url_domain_patterns(managers):
    m = await managers("wild", {"proxies": {"url_domain": "*.consoles.example.com"}})
    alice = m.account("alice")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key, host="10.1.2.3", address="1.2.3.4", port=8443, tls=True)
    answer = await m.endpoint(alice, vm)
    assert answer["websocket"]["host"] == "1-2-3-4.consoles.example.com"
    assert answer["url"].startswith("https://1-2-3-4.consoles.example.com:8443/")

    m2 = await managers("plain", {"proxies": {"url_domain": "console.example.org"}})
    bob = m2.account("bob")
    vm2 = m2.vm("bob")
    key2 = m2.proxy_key("p1")
    await m2.heartbeat(key2, host="10.1.2.3", address="1.2.3.4")
    answer = await m2.endpoint(bob, vm2)
    assert answer["websocket"]["host"] == "console.example.org"


@pytest_twisted.ensureDeferred
async def test_create_console_endpoint_failures(managers):
    m = await managers()
    alice = m.account("alice")
    bob = m.account("bob")
    root = m.account("root", is_admin=True)
    vm = m.vm("alice")
    stopped = m.vm("alice", name="off", state="Stopped")
    unknown = "00000000-0000-4000-8000-000000000000"

    answer = await m.endpoint(alice, vm)
    assert answer == {"success": False, "result": False, "details": "no console proxy available"}
    key = m.proxy_key("p1")
    await m.heartbeat(key)

    answer = await m.endpoint(bob, vm)
    assert answer["success"] is False and answer["result"] is False
    assert answer["details"].startswith("permission denied")
    answer = await m.endpoint(alice, unknown)
    assert answer["details"] == f"virtual machine {unknown} not found"
    answer = await m.endpoint(alice, stopped)
    assert "not running" in answer["details"]
    # owner and admin succeed
    assert (await m.endpoint(alice, vm))["success"] is True
    assert (await m.endpoint(root, vm))["success"] is True


@pytest_twisted.ensureDeferred
async def test_list_and_end_console_sessions(managers):
    m = await managers()
    alice = m.account("alice")
    bob = m.account("bob")
    root = m.account("root", is_admin=True)
    vm_a = m.vm("alice", name="a-vm")
    vm_b = m.vm("bob", name="b-vm")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    ta = (await m.endpoint(alice, vm_a, token="x"))["websocket"]["token"]
    await m.endpoint(bob, vm_b)
    status, redeemed = await m.redeem(key, ta, "x", "203.0.113.7")
    assert status == 200
    sid = redeemed["session_id"]

    status, body = await m.api(alice, "listConsoleSessions")
    sessions = body["listconsolesessionsresponse"]["consolesession"]
    assert body["listconsolesessionsresponse"]["count"] == 1
    s = sessions[0]
    assert s["id"] == sid and s["account"] == "alice" and s["virtualmachineid"] == vm_a
    assert s["vmname"] == "a-vm" and s["consoleproxy"] == "p1"
    assert s["creatoraddress"] == "127.0.0.1" and s["clientaddress"] == "203.0.113.7"
    assert "acquired" in s and "created" in s and "ended" not in s

    status, body = await m.api(root, "listConsoleSessions")
    assert body["listconsolesessionsresponse"]["count"] == 2
    status, body = await m.api(root, "listConsoleSessions", activeonly="true")
    assert [x["id"] for x in body["listconsolesessionsresponse"]["consolesession"]] == [sid]
    status, body = await m.api(root, "listConsoleSessions", account="bob")
    assert body["listconsolesessionsresponse"]["consolesession"][0]["account"] == "bob"
    status, body = await m.api(root, "listConsoleSessions", virtualmachineid=vm_a, id=sid)
    assert body["listconsolesessionsresponse"]["count"] == 1

    # bob may neither see nor end alice's session
    status, body = await m.api(bob, "endConsoleSession", id=sid)
    assert status == 431
    assert (await m.heartbeat(key, active=[sid]))["terminate"] == []
    # the owner may
    status, body = await m.api(alice, "endConsoleSession", id=sid)
    assert status == 200 and body == {"endconsolesessionresponse": {"success": True}}
    beat = await m.heartbeat(key, active=[sid])
    assert beat == {"heartbeat_interval": 5, "terminate": [sid], "taken_over": []}
    status, _ = await m.proxy(
        key,
        f"sessions/{sid}/end",
        {
            "reason": "terminated",
            "client_address": "203.0.113.7",
            "bytes_to_client": 1000,
            "bytes_to_server": 20,
            "duration": 3.5,
        },
    )
    assert status == 204
    assert (await m.heartbeat(key))["terminate"] == []
    status, body = await m.api(alice, "listConsoleSessions", id=sid)
    s = body["listconsolesessionsresponse"]["consolesession"][0]
    assert s["endreason"] == "terminated" and s["bytestoclient"] == 1000
    assert s["bytestoserver"] == 20 and "ended" in s and "removed" in s
    # ending it again is refused
    status, body = await m.api(root, "endConsoleSession", id=sid)
    assert status == 431


@pytest_twisted.ensureDeferred
async def test_documented_signing_snippet_works(managers):
    """The Python snippet in docs/public-api.md signs requests the manager accepts."""
    import re
    from pathlib import Path

    import treq

    doc = (Path(__file__).resolve().parents[2] / "docs" / "public-api.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {"__name__": "doc_snippet"}
    exec(snippet, namespace)
    m = await managers()
    alice = m.account("alice")
    query = namespace["signed_query"](
        {"command": "listConsoleSessions", "activeonly": "a b~*"}, alice.api_key, alice.secret
    )
    for method in ("GET", "POST"):
        if method == "GET":
            r = await treq.get(f"{m.base}/client/api?{query}", persistent=False)
        else:
            r = await treq.post(
                f"{m.base}/client/api",
                data=query.encode(),
                persistent=False,
                headers={"Content-Type": ["application/x-www-form-urlencoded"]},
            )
        # signature accepted; then activeonly's bad value is a 431, not a 401
        assert r.code == 431, await r.text()


@pytest_twisted.ensureDeferred
async def test_create_rate_limit_follows_the_injected_clock(managers):
    clock = Clock()
    clock.advance(1_800_000_000)
    m = await managers(
        clock=clock, sections={"security": {"create_rate": "0.5", "create_burst": "1"}}
    )
    alice = m.account("alice")
    vm = m.vm("alice")
    await m.heartbeat(m.proxy_key("p1"))
    answers = []
    for step in (0, 0, 1, 1):  # one token back every 2 s of the manager's clock
        clock.advance(step)
        answers.append(await m.api(alice, "createConsoleEndpoint", virtualmachineid=vm))
    assert [status for status, _ in answers] == [200, 429, 429, 200]
    texts = [_error(body, "createConsoleEndpoint")["errortext"] for _, body in answers[1:3]]
    assert "please retry after 2000 ms." in texts[0] and "after 1000 ms." in texts[1]
    # other commands are not limited
    assert (await m.api(alice, "listConsoleSessions"))[0] == 200
