"""The public API's parameter rules and signature expiry policy, as pure functions."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpvm.manager import signing
from cpvm.manager.params import ParamError, parse_params, validate_names

NOW = 1_800_000_000.0


def _signed(expires: str) -> dict[str, str]:
    return {
        "apiKey": "k",
        "command": "createConsoleEndpoint",
        "expires": expires,
        "response": "json",
        "signatureVersion": "3",
        "virtualmachineid": "v",
    }


def test_regrouped_request_has_the_same_string_to_sign_and_is_refused():
    expired = signing.format_time(NOW - 3600)
    genuine = _signed(expired)
    # The attack: one name swallows "expires=…&response=json&signatureversion".
    text = signing.string_to_sign(genuine)
    merged = text.split("expires=", 1)[1].split("&signatureversion=")[0]
    regrouped = {
        "apiKey": "k",
        "command": "createConsoleEndpoint",
        f"expires={merged}&signatureversion": "3",
        "virtualmachineid": "v",
    }
    assert signing.string_to_sign(regrouped) == text  # same signature would verify
    with pytest.raises(ParamError, match="only letters, digits and _ . \\[ \\] - are allowed"):
        validate_names(regrouped)
    with pytest.raises(signing.SignatureTimeError, match="request expired"):
        signing.check_expiry(
            {k.lower(): v for k, v in genuine.items()}, NOW, signing.ExpiryPolicy()
        )


@pytest.mark.parametrize("name", ["", "a=b", "a&b", "a%3Db", "a b", "ä", "a\x00", "a/b", "a+b"])
def test_names_outside_the_alphabet_are_refused(name):
    with pytest.raises(ParamError) as e:
        parse_params({name.encode(): [b"1"]})
    assert "Invalid parameter name" in e.value.text


def test_cloudstack_names_pass():
    params = parse_params({b"tags[0].key": [b"x"], b"a-b_c.d": [b""], b"Zz9": [b"\xc3\xa4"]})
    assert params == {"tags[0].key": "x", "a-b_c.d": "", "Zz9": "ä"}


@pytest.mark.parametrize(
    "args",
    [
        {b"expires": [b"1"], b"Expires": [b"2"]},
        {b"signatureVersion": [b"3"], b"SIGNATUREVERSION": [b"1"]},
        {b"apiKey": [b"a", b"b"]},  # one spelling, twice (query string and form body)
    ],
)
def test_names_repeated_case_insensitively_are_refused(args):
    with pytest.raises(ParamError) as e:
        parse_params(args)
    assert "given more than once" in e.value.text


def test_non_utf8_is_refused_and_long_names_are_shortened_in_the_text():
    with pytest.raises(ParamError, match="UTF-8"):
        parse_params({b"a": [b"\xff"]})
    with pytest.raises(ParamError) as e:
        parse_params({b"=" * 5000: [b"1"]})
    assert len(e.value.text) < 200


_names = st.from_regex(r"[A-Za-z0-9_.\[\]-]{1,12}", fullmatch=True)


@given(st.dictionaries(_names, st.text(max_size=20), max_size=8))
def test_valid_names_make_the_string_to_sign_decodable(params):
    """With the rules, the string to sign determines the (lower-cased) parameters."""
    try:
        validate_names(params)
    except ParamError:
        return  # names repeated case-insensitively: refused anyway
    text = signing.string_to_sign(params)
    decoded = {}
    for part in text.split("&") if text else []:
        name, _, value = part.partition("=")
        assert "%" not in name and name not in decoded
        decoded[name] = value
    assert decoded == {
        k.lower(): quote(v, safe="*").lower() for k, v in params.items() if k.lower() != "signature"
    }


def _check(policy, **params):
    signing.check_expiry({k.lower(): v for k, v in params.items()}, NOW, policy)


def test_expiry_required_by_default():
    policy = signing.ExpiryPolicy()
    for params in (
        {},
        {"signatureVersion": "1"},
        {"expires": signing.format_time(NOW + 60)},
        {"signatureVersion": "2"},
    ):
        with pytest.raises(signing.SignatureTimeError) as e:
            _check(policy, **params)
        assert e.value.text == signing.EXPIRY_REQUIRED
    _check(policy, signatureVersion="3", expires=signing.format_time(NOW + 60))


def test_expiry_optional_admits_v1_but_still_checks_expires():
    policy = signing.ExpiryPolicy(required=False)
    _check(policy)
    _check(policy, signatureVersion="1")
    with pytest.raises(signing.SignatureTimeError, match="requires expires"):
        _check(policy, signatureVersion="3")
    with pytest.raises(signing.SignatureTimeError, match="expired"):
        _check(policy, expires=signing.format_time(NOW - 1))
    with pytest.raises(signing.SignatureTimeError, match="unsupported"):
        _check(policy, signatureVersion="4")


def test_max_request_lifetime():
    policy = signing.ExpiryPolicy(max_lifetime=600)
    _check(policy, signatureVersion="3", expires=signing.format_time(NOW + 600))
    with pytest.raises(signing.SignatureTimeError) as e:
        _check(policy, signatureVersion="3", expires=signing.format_time(NOW + 601))
    assert e.value.text == "expires is too far ahead: at most 600 s from now"
    with pytest.raises(signing.SignatureTimeError, match="ISO-8601"):
        _check(policy, signatureVersion="3", expires="tomorrow")


def test_a_query_parameter_hidden_by_the_post_body_counts():
    # twisted.web keeps the body's value when a form POST repeats a query parameter
    args = {b"apiKey": [b"from-body"], b"command": [b"x"]}
    with pytest.raises(ParamError, match="'apiKey': given more than once"):
        parse_params(args, {b"apiKey": [b"from-query"]})
    assert parse_params(args, {b"command": [b"x"]}) == {"apiKey": "from-body", "command": "x"}


_raw = st.dictionaries(
    st.binary(max_size=12), st.lists(st.binary(max_size=12), max_size=3), max_size=6
)


@given(_raw, st.none() | _raw)
def test_any_bytes_give_params_or_a_param_error(args, query_args):
    try:
        params = parse_params(args, query_args)
    except ParamError as e:
        assert e.text
    else:
        validate_names(params)  # whatever is admitted obeys the rules
