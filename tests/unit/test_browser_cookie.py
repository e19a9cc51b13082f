"""The console cookie (cpvm/proxy/browser_cookie.py): minted, set, read back, hashed."""

from __future__ import annotations

import hashlib
from http.cookies import SimpleCookie

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpvm.common.contract import looks_like_browser_hash
from cpvm.proxy import browser_cookie as bc


def test_a_new_browser_gets_a_cookie_and_the_hash_of_that_very_cookie():
    proof, set_cookie = bc.browser_proof(None, tls=False)
    assert set_cookie is not None
    name, _, rest = set_cookie.partition("=")
    value = rest.split(";")[0]
    assert name == "cpvm_console" and len(value) == 43
    assert proof == hashlib.sha256(value.encode()).hexdigest()
    assert looks_like_browser_hash(proof)
    # What the browser sends back is recognised, and nothing new is set.
    again, nothing = bc.browser_proof(f"other=1; cpvm_console={value}", tls=False)
    assert (again, nothing) == (proof, None)


def test_attributes_keep_it_from_scripts_other_sites_and_plain_http():
    plain = bc.set_cookie("v" * 43, tls=False)
    assert plain == "cpvm_console=" + "v" * 43 + "; Path=/; HttpOnly; SameSite=Strict"
    tls = SimpleCookie()
    tls.load(bc.set_cookie("v" * 43, tls=True))
    morsel = tls["__Host-cpvm_console"]
    assert morsel["httponly"] and morsel["secure"] and morsel["samesite"] == "Strict"
    assert morsel["path"] == "/" and not morsel["domain"]


def test_each_new_cookie_is_random():
    values = {bc.new_value() for _ in range(100)}
    assert len(values) == 100 and all(len(v) == 43 for v in values)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "cpvm_console=short",
        "cpvm_console=" + "a" * 42 + "!",
        "cpvm_console=" + "a" * 44,
        "xcpvm_console=" + "a" * 43,
        # Two of ours (one planted for a parent domain): neither is trusted.
        "cpvm_console=" + "a" * 43 + "; cpvm_console=" + "b" * 43,
        # The TLS name is not accepted on a plain listener, nor the other way round.
        "__Host-cpvm_console=" + "a" * 43,
    ],
)
def test_anything_but_one_well_formed_cookie_is_no_cookie(header):
    assert bc.value_from_header(header, tls=False) is None
    proof, set_cookie = bc.browser_proof(header, tls=False)
    assert set_cookie is not None and looks_like_browser_hash(proof)


def test_under_tls_only_the_host_prefixed_name_counts():
    value = "c" * 43
    assert bc.value_from_header(f"__Host-cpvm_console={value}", tls=True) == value
    assert bc.value_from_header(f"cpvm_console={value}", tls=True) is None


@given(st.text(max_size=300))
def test_parsing_never_fails_and_only_returns_well_formed_values(header):
    value = bc.value_from_header(header, tls=False)
    assert value is None or (len(value) == 43 and value in header)
