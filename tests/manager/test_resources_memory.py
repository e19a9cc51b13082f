"""The manager's HTTP resources in memory (``StubTreq`` over ``build_site``, a real SQLite
database): the public API's errors, health and readiness, the proxy API's refusals —
and a console's whole round through both APIs without a socket."""

from __future__ import annotations

import json

import pytest

from cpvm.manager import store
from cpvm.manager.api_errors import BAD_CREDENTIALS
from tests.manager.memory import MemoryManager, memory_manager
from tests.signing import signed_query

BEAT = {
    "public_host": "cpvm.example.com",
    "public_port": 8443,
    "tls": True,
    "address": "192.0.2.10",
    "capacity": 10,
    "active_sessions": [],
    "version": "t",
}


@pytest.fixture
def m(tmp_path) -> MemoryManager:
    manager = memory_manager(tmp_path)
    yield manager
    manager.database.close()


def envelope(answer, command: str) -> dict:
    return answer.json()[f"{command.lower()}response"]


# -- public API ---------------------------------------------------------------------------


def test_no_command_and_unknown_command(m):
    alice = m.account("alice")
    answer = m.api(alice)
    assert answer.code == 432
    assert envelope(answer, "error") == {
        "uuidList": [],
        "errorcode": 432,
        "cserrorcode": 9999,
        "errortext": "no command given",
    }
    answer = m.api(alice, command="deployVirtualMachine")
    assert answer.code == 432
    assert envelope(answer, "deployVirtualMachine")["errortext"] == (
        "unknown command 'deployVirtualMachine'"
    )
    # Without valid credentials an unknown command is a credentials error, not a hint.
    answer = m.api(None, command="deployVirtualMachine", apiKey=alice.api_key, signature="x")
    assert answer.code == 401


@pytest.mark.parametrize("change", ["secret", "parameter", "no-signature", "no-key", "unknown-key"])
def test_bad_signatures_get_the_cloudstack_401(m, change):
    alice = m.account("alice")
    params = {"command": "listConsoleSessions"}
    if change == "secret":
        answer = m.api(type(alice)(alice.account_id, alice.api_key, "not-the-secret"), **params)
    elif change == "parameter":
        # Signed for activeonly=true, sent with false.
        signed = signed_query(
            {"response": "json", "activeonly": "true", **params},
            alice.api_key,
            alice.secret,
            expires_at=m.clock.seconds() + 300,
        )
        answer = m.api(None, **{**signed, "activeonly": "false"})
    elif change == "no-signature":
        answer = m.api(None, apiKey=alice.api_key, **params)
    elif change == "no-key":
        answer = m.api(None, signature="abc", **params)
    else:
        answer = m.api(type(alice)(alice.account_id, "no-such-key", alice.secret), **params)
    assert answer.code == 401
    assert envelope(answer, "listConsoleSessions") == {
        "uuidList": [],
        "errorcode": 401,
        "cserrorcode": 9999,
        "errortext": BAD_CREDENTIALS,
    }
    assert answer.headers["content-type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize(
    "params, text",
    [
        (
            {"command": "createConsoleEndpoint"},
            "Unable to execute API command createconsoleendpoint due to missing parameter "
            "virtualmachineid",
        ),
        (
            {"command": "createConsoleEndpoint", "virtualmachineid": "not-a-uuid"},
            "Invalid parameter virtualmachineid value: not a UUID",
        ),
        (
            {"command": "endConsoleSession"},
            "Unable to execute API command endconsolesession due to missing parameter id",
        ),
        (
            {"command": "listConsoleSessions", "activeonly": "maybe"},
            "Invalid parameter activeonly value='maybe': expected true or false",
        ),
        ({"command": "listConsoleSessions", "response": "xml"}, "only response=json is supported"),
    ],
)
def test_missing_and_bad_parameters_get_431(m, params, text):
    answer = m.api(m.account("alice"), **params)
    assert answer.code == 431
    assert envelope(answer, params["command"])["errortext"] == text


def test_signature_version_3_needs_a_future_expiry(m):
    alice = m.account("alice")
    answer = m.api(alice, command="listConsoleSessions", signatureVersion="3")
    assert (answer.code, envelope(answer, "listConsoleSessions")["errortext"]) == (
        401,
        "signatureVersion=3 requires expires",
    )
    answer = m.api(
        alice,
        command="listConsoleSessions",
        signatureVersion="3",
        expires="2020-01-01T00:00:00+0000",
    )  # the clock says 2027
    assert envelope(answer, "listConsoleSessions")["errortext"] == "request expired"


# -- health and readiness ----------------------------------------------------------------


def test_healthz_and_readyz(m):
    assert m.http.get("http://manager.test/healthz").body == b"ok\n"
    ready = m.http.get("http://manager.test/readyz")
    assert (ready.code, ready.body) == (200, b"ready\n")
    m.database.ping_outcome = RuntimeError("connection refused")
    ready = m.http.get("http://manager.test/readyz")
    assert (ready.code, ready.body) == (503, b"database unreachable\n")


def test_readyz_gives_up_on_a_database_that_does_not_answer(m):
    m.database.ping_outcome = "hang"
    answers: list = []
    m.http.treq.get("http://manager.test/readyz").addBoth(answers.append)
    m.http.treq.flush()
    assert answers == []
    m.clock.advance(5)  # ReadyResource's timeout
    m.http.treq.flush()
    assert answers[0].code == 503


# -- proxy API -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization, message",
    [
        (None, "missing Authorization header"),
        ("Basic Y3B2bTpwdw==", "expected a Bearer proxy key"),
        ("Bearer ", "expected a Bearer proxy key"),
        ("Bearer not-a-proxy-key", "unknown, malformed or revoked proxy key"),
        ("Bearer cpvmk_00000000.guessed", "unknown, malformed or revoked proxy key"),
    ],
)
def test_proxy_api_refuses_callers_without_a_valid_key(m, authorization, message, log_events):
    m.proxy_key()
    answer = m.proxy(None, "v1/heartbeat", json.dumps(BEAT), authorization=authorization)
    assert (answer.code, answer.json()) == (401, {"error": "unauthorized", "message": message})
    [warning] = [e for e in log_events if e.get("log_format", "").startswith("proxy API")]
    assert warning["message"] == message


def test_bad_body_is_401_without_a_key_and_400_with_one(m):
    key = m.proxy_key()
    wrong = key[:-3] + "xyz"
    assert m.proxy(wrong, "v1/heartbeat", "not json").code == 401
    answer = m.proxy(key, "v1/heartbeat", "not json")
    assert (answer.code, answer.json()) == (
        400,
        {"error": "bad_request", "message": "body is not JSON"},
    )
    answer = m.proxy(key, "v1/heartbeat", json.dumps({**BEAT, "tls": "yes"}))
    assert (answer.code, answer.json()["message"]) == (400, "tls must be true or false")


def test_revoked_key_is_refused(m):
    key = m.proxy_key("cpvm-old")
    assert m.proxy(key, "v1/heartbeat", json.dumps(BEAT)).code == 200
    m.run(store.revoke_proxy, "cpvm-old", m.clock.seconds())
    assert m.proxy(key, "v1/heartbeat", json.dumps(BEAT)).code == 401


def test_proxy_api_routes(m):
    key = m.proxy_key()
    assert m.proxy(key, "v1/heartbeat", method="GET").json()["error"] == "method_not_allowed"
    assert m.proxy(key, "v1/nothing").code == 404
    assert m.proxy(key, "v2/heartbeat").code == 404
    answer = m.proxy(
        key,
        "v1/sessions/not-a-uuid/end",
        json.dumps({"reason": "client_closed", "bytes_to_client": 0, "bytes_to_server": 0}),
    )
    assert (answer.code, answer.json()["error"]) == (404, "unknown_session")


# -- a console's round, in memory ----------------------------------------------------------


def test_endpoint_redemption_and_end_through_both_apis(m, log_events):
    alice = m.account("alice")
    vm = m.vm(alice)
    key = m.proxy_key()
    assert m.proxy(key, "v1/heartbeat", json.dumps(BEAT)).json() == {
        "heartbeat_interval": 5,
        "terminate": [],
        "taken_over": [],
    }
    answer = m.api(alice, command="createConsoleEndpoint", virtualmachineid=vm)
    endpoint = envelope(answer, "createConsoleEndpoint")["consoleendpoint"]
    assert endpoint["success"] is True
    assert endpoint["url"].startswith("https://cpvm.example.com:8443/")
    token = endpoint["websocket"]["token"]
    m.secrets_seen.append(token)
    redeem = {"token": token, "extra": None, "client_address": "203.0.113.9"}
    answer = m.proxy(key, "v1/redeem", json.dumps(redeem))
    assert answer.code == 200
    body = answer.json()
    assert body["vnc"]["password"] == "vncsecret-1" and body["vm"]["id"] == vm
    again = m.proxy(key, "v1/redeem", json.dumps(redeem))
    assert (again.code, again.json()["error"]) == (409, "token_used")
    end = {"reason": "client_closed", "bytes_to_client": 10, "bytes_to_server": 2}
    assert m.proxy(key, f"v1/sessions/{body['session_id']}/end", json.dumps(end)).code == 204
    listed = envelope(m.api(alice, command="listConsoleSessions"), "listConsoleSessions")
    assert [s["endreason"] for s in listed["consolesession"]] == ["client_closed"]
    # Nothing secret reached a log line on the way.
    text = json.dumps([{k: str(v) for k, v in e.items()} for e in log_events])
    leaked = [s[:4] + "…" for s in m.secrets_seen if s in text]
    assert not leaked
