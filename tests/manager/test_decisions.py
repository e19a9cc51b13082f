"""The broker's pure decisions (cpvm/manager/decisions.py): proxy selection, the console's
host name, the redemption checks in their order, the proxy key's syntax."""

from __future__ import annotations

import dataclasses

import pytest

from cpvm.manager import store
from cpvm.manager.decisions import check_redemption, choose_proxy, console_host, parse_proxy_key
from cpvm.manager.secrets_box import sha256_hex


def _load(pid, active, capacity, pending=0, vm_sessions=0):
    p = store.Proxy(pid, pid, 0, None, "h", 8080, False, None, capacity, active, None, 0)
    return store.ProxyLoad(p, pending, vm_sessions)


def test_choose_proxy_rules():
    a, b, c = _load("a", 5, 10), _load("b", 2, 10), _load("c", 10, 40)
    assert choose_proxy([a, b, c]).proxy.id == "b"  # 0.2 < 0.25 < 0.5
    assert choose_proxy([a, _load("full", 10, 10)]).proxy.id == "a"
    assert choose_proxy([_load("full", 10, 10), _load("zero", 0, 0)]) is None
    assert choose_proxy([a, b, _load("s", 8, 10, vm_sessions=1)]).proxy.id == "s"
    assert choose_proxy([a, b, _load("s", 9, 10, pending=1, vm_sessions=1)]).proxy.id == "b"
    assert choose_proxy([]) is None


def test_console_host_patterns():
    assert console_host("cpvm.example", "1.2.3.4", None) == "cpvm.example"
    assert console_host("cpvm.example", "1.2.3.4", "*.c.example.com") == "1-2-3-4.c.example.com"
    assert console_host("cpvm.example", "2001:db8::1", "*.c.io") == "2001-db8--1.c.io"
    assert console_host("cpvm.example", None, "*.c.io") == "cpvm.example"
    assert console_host("cpvm.example", "1.2.3.4", "console.example.org") == "console.example.org"


NOW = 1_800_000_000.0
VM = store.Vm(
    "vm-1", "web-01", "acct-1", "alice", "Running", "10.0.0.5", 5901, None, "none", None, None
)
ROW = store.TokenRow(
    session_id="s-1",
    proxy_id="p1",
    expires_at=NOW + 60,
    acquired_at=None,
    ended_at=None,
    extra_hash="h-extra",
    bound_address="203.0.113.7",
    account_name="alice",
    vm_id="vm-1",
    vm=VM,
)


def _check(row, proxy_id="p1", extra_hash="h-extra", client_address="203.0.113.7", now=NOW):
    return check_redemption(
        row, proxy_id=proxy_id, extra_hash=extra_hash, client_address=client_address, now=now
    )


def test_a_valid_redemption_passes():
    assert _check(ROW) is None
    # The bound address compares as an address, not as text.
    row = dataclasses.replace(ROW, bound_address="2001:db8::1")
    assert _check(row, client_address="2001:0db8:0:0::1") is None
    assert _check(dataclasses.replace(ROW, bound_address=None), client_address="6.6.6.6") is None


@pytest.mark.parametrize(
    "change, call, error",
    [
        ({}, {"proxy_id": "p2"}, "wrong_proxy"),
        ({"acquired_at": NOW - 1}, {}, "token_used"),
        ({"ended_at": NOW - 1}, {}, "expired_token"),
        ({}, {"now": NOW + 61}, "expired_token"),
        ({}, {"extra_hash": "other"}, "extra_mismatch"),
        ({"extra_hash": None}, {"extra_hash": "h-extra"}, "extra_mismatch"),
        ({}, {"client_address": "198.51.100.9"}, "address_mismatch"),
        ({"vm": None}, {}, "vm_unavailable"),
        ({"vm": dataclasses.replace(VM, state="Stopped")}, {}, "vm_unavailable"),
        ({"account_ok": False}, {}, "account_unavailable"),
    ],
)
def test_each_check_refuses_with_its_error(change, call, error):
    assert _check(dataclasses.replace(ROW, **change), **call) == error


def test_the_checks_run_in_the_contract_order():
    assert _check(None) == "invalid_token"
    # The proxy is checked before the token's use, the use before the extra.
    used_elsewhere = dataclasses.replace(ROW, acquired_at=NOW - 1)
    assert _check(used_elsewhere, proxy_id="p2") == "wrong_proxy"
    assert _check(used_elsewhere, extra_hash="other") == "token_used"


def test_proxy_key_syntax():
    assert parse_proxy_key("cpvmk_ab12.s3cret") == ("ab12", sha256_hex("s3cret"))
    # Only the first dot separates the id from the secret.
    assert parse_proxy_key("cpvmk_ab12.s3.cret") == ("ab12", sha256_hex("s3.cret"))
    for bad in ("", "ab12.s3cret", "cpvmk_ab12", "cpvmk_.s3cret", "cpvmk_ab12.", "cpvmx_a.b"):
        assert parse_proxy_key(bad) is None, bad
    assert parse_proxy_key("cpvmk_a." + "s" * 504) is not None  # 512 characters
    assert parse_proxy_key("cpvmk_a." + "s" * 505) is None
