"""Attacks on the public API of a real ``twistd cpvm-manager`` (security issue, findings 1,
5 and 9): re-grouped signed requests, parameter names, signature expiry, the
createConsoleEndpoint rate limit and the /metrics command label."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest

from cpvm.manager import signing
from tests.manager.real_manager import ManagerDaemon, errortext

CREATE = "createConsoleEndpoint"
LIST = "listConsoleSessions"


@pytest.fixture
def start_manager(tmp_path):
    started: list[ManagerDaemon] = []

    def start(name: str = "m", sections: dict | None = None) -> ManagerDaemon:
        manager = ManagerDaemon(tmp_path / name, sections)
        started.append(manager)
        return manager

    yield start
    for manager in started:
        manager.stop()


@pytest.fixture
def ready(start_manager):
    """A manager with account alice, her VM and a live proxy."""
    m = start_manager()
    alice = m.account("alice")
    vm = m.vm("alice")
    m.heartbeat(m.proxy_key())
    return m, alice, vm


def _regrouped(genuine: dict[str, str]) -> dict[str, str]:
    """The same signed request with expires/response/signatureVersion merged into one
    parameter name: the string to sign (and so the signature) is unchanged."""
    merged = f"expires={quote(genuine['expires'], safe='*')}&response=json&signatureversion"
    attack = {
        k: v for k, v in genuine.items() if k not in ("expires", "response", "signatureVersion")
    }
    attack[merged] = "3"
    assert signing.string_to_sign(attack) == signing.string_to_sign(genuine)
    return attack


def test_expired_signed_url_regrouped_is_refused(ready):
    m, alice, vm = ready
    leaked = m.signed(alice, CREATE, ttl=-60, virtualmachineid=vm)  # expired a minute ago
    status, body, _ = m.query(leaked)
    assert status == 401 and errortext(body, CREATE) == "request expired"
    for method in ("GET", "POST"):
        status, body, _ = m.query(_regrouped(leaked), method)
        # Before the fix: 200 and a fresh console token.
        assert status == 431, body
        text = errortext(body, "error")
        assert text.startswith("Invalid parameter name 'expires=")
        assert text.endswith("only letters, digits and _ . [ ] - are allowed")
        assert "websocket" not in repr(body)
    # the signature was sound all along: the manager still serves signed requests
    status, body = m.api(alice, CREATE, virtualmachineid=vm)
    assert status == 200 and body["createconsoleendpointresponse"]["consoleendpoint"]["success"]
    status, body = m.api(alice, LIST)
    assert body["listconsolesessionsresponse"]["count"] == 1  # only the genuine one
    log = m.log_text()
    assert "api None -> 431 Invalid parameter name 'expires=" in log  # refused, and logged
    assert leaked["signature"] not in log and alice.secret not in log


def test_names_repeated_case_insensitively_are_refused(ready):
    m, alice, vm = ready
    query = m.signed(alice, LIST)
    # a second spelling of signatureVersion: which one counts would depend on the order
    status, body, _ = m.query({**query, "SIGNATUREVERSION": "1"})
    assert status == 431  # refused before the command is read: CloudStack's "errorresponse"
    assert errortext(body, "error") == (
        "Invalid parameter 'SIGNATUREVERSION': given more than "
        "once (parameter names are compared case-insensitively)"
    )
    # the same name in the query string and in the POST body (twisted.web would keep
    # only the body's value)
    status, body, _ = m.request(
        "/client/api?apiKey=another-key",
        "&".join(f"{k}={quote(v)}" for k, v in query.items()).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 431 and "'apiKey': given more than once" in errortext(body, "error")
    status, _, _ = m.query(query)
    assert status == 200


def test_requests_without_expiry_are_refused_by_default(ready):
    m, alice, vm = ready
    v1 = m.signed(alice, CREATE, ttl=None, virtualmachineid=vm)  # libcloud-style
    status, body, _ = m.query(v1)
    assert status == 401
    assert body == {
        "createconsoleendpointresponse": {
            "uuidList": [],
            "errorcode": 401,
            "cserrorcode": 9999,
            "errortext": "this API requires signatureVersion=3 and expires: requests without "
            "an expiry time are refused",
        }
    }
    status, body, _ = m.query(
        m.signed(alice, CREATE, ttl=None, signatureVersion="1", virtualmachineid=vm)
    )
    assert status == 401


def test_signature_expiry_optional_admits_v1_clients(start_manager):
    m = start_manager("optional", {"security": {"signature_expiry": "optional"}})
    alice = m.account("alice")
    vm = m.vm("alice")
    m.heartbeat(m.proxy_key())
    status, body, _ = m.query(m.signed(alice, CREATE, ttl=None, virtualmachineid=vm))
    assert status == 200
    assert body["createconsoleendpointresponse"]["consoleendpoint"]["success"] is True
    # an expires is still enforced, and names are still checked
    status, body, _ = m.query(m.signed(alice, CREATE, ttl=-5, virtualmachineid=vm))
    assert status == 401 and errortext(body, CREATE) == "request expired"
    leaked = m.signed(alice, CREATE, ttl=-60, virtualmachineid=vm)
    status, _, _ = m.query(_regrouped(leaked))
    assert status == 431


def test_expires_far_ahead_is_refused(ready, start_manager):
    m, alice, vm = ready
    status, body, _ = m.query(m.signed(alice, LIST, ttl=3600))
    assert status == 401
    assert errortext(body, LIST) == "expires is too far ahead: at most 600 s from now"
    status, _, _ = m.query(m.signed(alice, LIST, ttl=500))
    assert status == 200
    longer = start_manager("longer", {"security": {"max_request_lifetime": "7200"}})
    bob = longer.account("bob")
    status, _, _ = longer.query(longer.signed(bob, LIST, ttl=3600))
    assert status == 200


def test_create_console_endpoint_is_rate_limited_per_api_key(start_manager):
    # A bucket of 3 refilling once in 1000 s: the test never sees a refill.
    m = start_manager("limited", {"security": {"create_rate": "0.001", "create_burst": "3"}})
    alice = m.account("alice")
    bob = m.account("bob")
    vm = m.vm("alice")
    m.admin(
        "vm", "add", "--name", "b", "--owner", "bob", "--vnc-host", "10.0.0.6", "--vnc-port", "5901"
    )
    m.heartbeat(m.proxy_key())
    answers = [m.query(m.signed(alice, CREATE, virtualmachineid=vm)) for _ in range(10)]
    assert [s for s, _, _ in answers] == [200] * 3 + [429] * 7
    status, body, headers = answers[-1]
    error = body["createconsoleendpointresponse"]
    assert error["errorcode"] == 429 and error["cserrorcode"] == 9999
    assert re.fullmatch(
        r"The given user has reached his/her account api limit, please retry "
        r"after \d+ ms\. \(createConsoleEndpoint is rate-limited per API key\)",
        error["errortext"],
    ), error["errortext"]
    assert 1 <= int(headers["Retry-After"]) <= 1000
    # the manager issued only what the limit allows
    status, body = m.api(alice, LIST)
    assert status == 200 and body["listconsolesessionsresponse"]["count"] == 3
    # a bad signature under alice's key does not spend anyone's budget; bob has his own
    forged = m.signed(bob, CREATE, virtualmachineid=vm)
    forged["apiKey"] = alice.api_key
    assert m.query(forged)[0] == 401
    status, body = m.api(bob, CREATE, virtualmachineid=vm)
    assert status == 200  # bob: answered (permission denied for alice's VM), not throttled
    assert not body["createconsoleendpointresponse"]["consoleendpoint"]["success"]


def test_metrics_command_label_is_canonical(ready):
    m, alice, vm = ready
    spellings = [
        "listConsoleSessions",
        "LISTCONSOLESESSIONS",
        "listconsolesessions",
        "ListConsoleSessions",
        "lIsTcOnSoLeSeSsIoNs",
    ]
    for spelling in spellings:
        assert m.api(alice, spelling)[0] == 200
    for bogus in ("deployVirtualMachine", "DEPLOYvirtualMACHINE", "x" * 300):
        assert m.api(alice, bogus)[0] == 432
    series = re.findall(
        r'^cpvm_manager_api_requests_total\{command="([^"]*)",status="(\d+)"\} '
        r"(\S+)$",
        m.metrics(),
        re.M,
    )
    by_label = {(c, s): float(v) for c, s, v in series}
    assert by_label[("listConsoleSessions", "200")] == len(spellings)
    assert by_label[("unknown", "432")] == 3
    assert {c for c, _ in by_label} <= {
        "listConsoleSessions",
        "createConsoleEndpoint",
        "endConsoleSession",
        "unknown",
    }
