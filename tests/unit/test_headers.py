"""Security headers: the CSP cpvm sends, frame_ancestors parsing and validation."""

from __future__ import annotations

import pytest
from twisted.web.test.requesthelper import DummyRequest

from cpvm.common.inifile import ConfigError
from cpvm.proxy.config import load_config
from cpvm.proxy.headers import SecurityHeaders, check_frame_ancestors


def directives(policy: bytes) -> dict[str, list[str]]:
    out = {}
    for part in policy.decode().split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def test_connect_src_is_cpvm_itself():
    h = SecurityHeaders(tls=False, frame_ancestors="'self'")
    d = directives(h.policy(b"cpvm.example:8080"))
    assert d["connect-src"] == ["'self'", "ws://cpvm.example:8080"]
    assert d["default-src"] == ["'none'"] and d["script-src"] == ["'self'"]
    assert d["frame-ancestors"] == ["'self'"]
    tls = directives(SecurityHeaders(tls=True, frame_ancestors="'none'").policy(b"[::1]:8443"))
    assert tls["connect-src"] == ["'self'", "wss://[::1]:8443"]


@pytest.mark.parametrize(
    "host",
    [None, b"", b"evil.example; connect-src *", b"a b", b"x.example\n", b"x.example:99999999"],
)
def test_a_strange_host_header_adds_nothing(host):
    policy = SecurityHeaders(tls=False, frame_ancestors="'self'").policy(host)
    assert directives(policy)["connect-src"] == ["'self'"]
    assert b"evil" not in policy and b"\n" not in policy


def test_headers_on_a_request():
    request = DummyRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:8443"])
    SecurityHeaders(tls=True, frame_ancestors="'self'").apply(request)
    got = {k.lower(): v[0] for k, v in request.responseHeaders.getAllRawHeaders()}
    assert got[b"x-content-type-options"] == b"nosniff"
    assert got[b"strict-transport-security"] == b"max-age=31536000"
    assert got[b"x-frame-options"] == b"SAMEORIGIN"
    assert got[b"referrer-policy"] == b"no-referrer"
    assert b"wss://127.0.0.1:8443" in got[b"content-security-policy"]
    plain = DummyRequest([b""])
    SecurityHeaders(tls=False, frame_ancestors="https://dash.example").apply(plain)
    names = {k.lower() for k, _ in plain.responseHeaders.getAllRawHeaders()}
    assert b"strict-transport-security" not in names and b"x-frame-options" not in names


@pytest.mark.parametrize(
    "sources, expected",
    [
        (("'self'",), "'self'"),
        (("'none'",), "'none'"),
        (
            ("'self'", "https://dash.example/", "https://*.example.org:8443"),
            "'self' https://dash.example https://*.example.org:8443",
        ),
    ],
)
def test_frame_ancestors_accepted(sources, expected):
    assert check_frame_ancestors(sources) == expected


@pytest.mark.parametrize(
    "sources",
    [
        (),
        ("'none'", "'self'"),
        ("self",),
        ("*",),
        ("dash.example",),
        ("https://dash.example/path",),
        ("javascript:alert(1)",),
        ("https://a;b",),
        ("https://dash.example?x",),
    ],
)
def test_frame_ancestors_refused(sources):
    with pytest.raises(ValueError):
        check_frame_ancestors(sources)


def test_frame_ancestors_in_the_config(tmp_path):
    assert load_config(None).server.frame_ancestors == "'self'"
    p = tmp_path / "cpvm.conf"
    p.write_text("[server]\nframe_ancestors = 'self' https://dash.example\n")
    assert load_config(str(p)).server.frame_ancestors == "'self' https://dash.example"
    p.write_text("[server]\nframe_ancestors = dash.example\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert str(e.value).startswith(f"{p}: [server] frame_ancestors: ")
