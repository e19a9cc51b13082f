"""cpvm's manager client against stubbed manager answers (treq.testing)."""

import json

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from cpvm.common.contract import Outcome, ViewerPolicy
from cpvm.proxy.manager_client import (
    InstanceConflict,
    ManagerClient,
    ManagerUnavailable,
    RedemptionRefused,
    parse_redemption,
    proxy_key_id,
)

GOOD = {
    "session_id": "s-1",
    "vm": {"id": "vm-1", "name": "web-01"},
    "vnc": {
        "host": "127.0.0.1",
        "port": 5901,
        "password": "pw",
        "tls": "none",
        "ca_pem": None,
        "server_name": None,
    },
    "limits": {"idle_timeout": 60, "max_duration": None},
    "account": "alice",
}


class Answer(Resource):
    isLeaf = True

    def __init__(self, status, body, raw=None):
        super().__init__()
        self.status, self.body, self.raw = status, body, raw
        self.requests = []

    def render_POST(self, request):  # noqa: N802
        self.requests.append(
            (request.path, request.getHeader(b"authorization"), json.loads(request.content.read()))
        )
        request.setResponseCode(self.status)
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body).encode()


INSTANCE = "0123456789abcdef0123456789abcdef"


def client(resource, clock=None):
    return ManagerClient(
        clock or Clock(),
        "http://manager.invalid",
        "cpvmk_a.secret",
        5,
        http=StubTreq(resource),
        instance=INSTANCE,
    )


@pytest_twisted.ensureDeferred
async def test_redeem_success_sends_credential_and_parses_target():
    res = Answer(200, GOOD)
    r = await client(res).redeem("tok", "x", "203.0.113.7")
    path, auth, body = res.requests[0]
    assert path == b"/proxy/v1/redeem"
    assert auth == b"Bearer cpvmk_a.secret"
    assert body == {
        "token": "tok",
        "extra": "x",
        "client_address": "203.0.113.7",
        "worker": 0,
        "instance": INSTANCE,
    }
    assert r.session_id == "s-1" and r.vm_name == "web-01" and r.account == "alice"
    assert r.vnc.port == 5901 and r.vnc.password == b"pw"
    assert r.idle_timeout == 60 and r.max_duration is None
    assert "pw" not in repr(r.vnc)
    assert r.reconnects == 0  # a first redemption: the manager's answer has no count


@pytest_twisted.ensureDeferred
async def test_redeem_carries_the_browser_hash_and_reads_the_reconnect_count():
    res = Answer(200, {**GOOD, "reconnects": 2})
    r = await client(res).redeem("tok", None, "203.0.113.7", "ab" * 32)
    assert res.requests[0][2]["browser_hash"] == "ab" * 32
    assert r.reconnects == 2


@pytest.mark.parametrize(
    "status, error, outcome",
    [
        (404, "invalid_token", Outcome.INVALID_TOKEN),
        (410, "expired_token", Outcome.EXPIRED_TOKEN),
        (409, "token_used", Outcome.TOKEN_USED),
        (403, "extra_mismatch", Outcome.EXTRA_MISMATCH),
        (403, "address_mismatch", Outcome.ADDRESS_MISMATCH),
        (403, "wrong_proxy", Outcome.WRONG_PROXY),
        (409, "instance_conflict", Outcome.INSTANCE_CONFLICT),
    ],
)
@pytest_twisted.ensureDeferred
async def test_refusals_map_to_close_codes(status, error, outcome):
    with pytest.raises(RedemptionRefused) as e:
        await client(Answer(status, {"error": error, "message": "m"})).redeem("t", None, "a")
    assert e.value.outcome is outcome


@pytest.mark.parametrize(
    "status, body, raw",
    [
        (500, {"error": "internal"}, None),
        (401, {"error": "unauthorized"}, None),
        (200, None, b"not json"),
        (200, {"session_id": "s"}, None),
        (418, {"error": "teapot"}, None),
        (200, {**GOOD, "vnc": {**GOOD["vnc"], "port": 99999}}, None),
        (200, {**GOOD, "vnc": {**GOOD["vnc"], "tls": "maybe"}}, None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_broken_answers_mean_manager_unavailable(status, body, raw):
    with pytest.raises(ManagerUnavailable):
        await client(Answer(status, body, raw)).redeem("t", None, "a")


class Redirect(Resource):
    """A manager (or whatever answers at its address) sending the call elsewhere."""

    def __init__(self):
        super().__init__()
        self.elsewhere = Answer(200, GOOD)
        self.putChild(b"elsewhere", self.elsewhere)

    def getChild(self, path, request):  # noqa: N802
        return self

    def render_POST(self, request):  # noqa: N802
        request.setResponseCode(307)
        request.setHeader(b"Location", b"http://manager.invalid/elsewhere")
        return b""


@pytest_twisted.ensureDeferred
async def test_redirects_are_not_followed():
    # Following would re-send the token and the proxy key to wherever Location points.
    res = Redirect()
    with pytest.raises(ManagerUnavailable, match="HTTP 307"):
        await client(res).redeem("tok", None, "a")
    assert res.elsewhere.requests == []


@pytest_twisted.ensureDeferred
async def test_oversized_answer_is_refused():
    big = json.dumps({**GOOD, "pad": "x" * 300_000}).encode()
    with pytest.raises(ManagerUnavailable, match="larger than"):
        await client(Answer(200, None, big)).redeem("t", None, "a")


def test_parse_redemption_rejects_bad_types():
    for bad in (
        [],
        {"session_id": 1},
        {**GOOD, "vnc": {**GOOD["vnc"], "password": 5}},
        {**GOOD, "limits": {"idle_timeout": -1}},
        {**GOOD, "reconnects": -1},
        {**GOOD, "reconnects": True},
        {**GOOD, "reconnects": "1"},
        {**GOOD, "view_only": "yes"},
        {**GOOD, "viewer_policy": "first-come"},
        {**GOOD, "taken_over": "s-1"},
        {**GOOD, "taken_over": [7]},
    ):
        with pytest.raises(ValueError):
            parse_redemption(bad)


def test_parse_redemption_view_only_and_viewer_policy():
    # A manager that predates them: a full console under the shared policy.
    plain = parse_redemption(GOOD)
    assert (plain.view_only, plain.viewer_policy, plain.taken_over) == (
        False,
        ViewerPolicy.SHARED,
        (),
    )
    r = parse_redemption(
        {**GOOD, "view_only": True, "viewer_policy": "takeover", "taken_over": ["s-1", "s-2"]}
    )
    assert (r.view_only, r.viewer_policy, r.taken_over) == (
        True,
        ViewerPolicy.TAKEOVER,
        ("s-1", "s-2"),
    )


@pytest_twisted.ensureDeferred
async def test_heartbeat_carries_the_instance_and_names_a_conflict():
    ok = Answer(200, {"heartbeat_interval": 5, "terminate": []})
    await client(ok).heartbeat({"public_host": "h"})
    assert ok.requests[0][2] == {"public_host": "h", "worker": 0, "instance": INSTANCE}
    refused = Answer(409, {"error": "instance_conflict", "message": "m"})
    with pytest.raises(InstanceConflict, match="proxy key a is in use") as e:
        await client(refused).heartbeat({})
    assert "secret" not in str(e.value)
    # Any other 409 is just an unusable answer.
    with pytest.raises(ManagerUnavailable) as e:
        await client(Answer(409, {"error": "token_used"})).heartbeat({})
    assert not isinstance(e.value, InstanceConflict)


def test_proxy_key_id_is_the_public_part_only():
    assert proxy_key_id("cpvmk_0a1b2c3d.s3cret") == "0a1b2c3d"
    assert proxy_key_id("cpvmk_a b.s3cret") == "(unnamed)"
    assert proxy_key_id("just-a-secret") == "(unnamed)"
    assert proxy_key_id(None) == "(none)"


def test_redemption_says_whether_the_session_is_recorded():
    assert parse_redemption(GOOD).recording is False
    assert parse_redemption({**GOOD, "recording": True}).recording is True
    with pytest.raises(ValueError, match="recording"):
        parse_redemption({**GOOD, "recording": "yes"})


@pytest_twisted.ensureDeferred
async def test_playback_ticket_redeemed_for_a_session_id():
    res = Answer(200, {"session_id": "s-9"})
    assert await client(res).redeem_playback("tkt") == "s-9"
    path, auth, body = res.requests[0]
    assert path == b"/proxy/v1/playback" and auth == b"Bearer cpvmk_a.secret"
    assert body == {"ticket": "tkt", "instance": INSTANCE}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (409, {"error": "ticket_used", "message": "this playback link was already used"}, 409),
        (404, {"error": "invalid_ticket"}, 404),
        (500, None, 503),
        (200, {"session_id": 5}, 503),
    ],
)
@pytest_twisted.ensureDeferred
async def test_playback_refusals_keep_the_managers_status(status, body, expected):
    from cpvm.proxy.recording.player import PlaybackRefused

    with pytest.raises(PlaybackRefused) as e:
        await client(Answer(status, body)).redeem_playback("tkt")
    assert e.value.status == expected
    if status == 409:
        assert "already used" in e.value.message
