"""The pure rules of a proxy key's limits and of a heartbeat's public_host."""

from __future__ import annotations

import ipaddress
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpvm.manager.decisions import console_url
from cpvm.manager.proxy_policy import (
    ProxyPolicy,
    format_networks,
    parse_allow,
    policy_from_row,
    public_host_problem,
)

GOOD_HOSTS = [
    "cpvm.example.com",
    "cpvm-1.example.com.",
    "localhost",
    "a",
    "127.0.0.1",
    "::1",
    "2001:db8::10",
    "xn--bcher-kva.example",
    "1host.example",
    "a" * 63,
]
BAD_HOSTS = [
    "https://evil.example",
    "evil.example/path",
    "evil.example:8443",
    "user@evil.example",
    "evil example",
    "evil.example\n",
    " evil.example",
    "[::1]",
    "1.2.3",
    "10.0.0.256",
    "-evil.example",
    "evil-.example",
    "evil..example",
    ".",
    "a" * 64 + ".example",
    "fe80::1%eth0",
    "évil.example",
    "evil.example?x=1",
    "evil.example#x",
    "evil_1.example",
    "evil%2eexample",
    "evil\\example",
    "x." * 127 + "x",
]


@pytest.mark.parametrize("host", GOOD_HOSTS)
def test_plain_names_and_addresses_accepted(host):
    assert public_host_problem(host) is None


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_anything_else_refused_with_a_reason(host):
    problem = public_host_problem(host)
    assert problem and problem.startswith("public_host")


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=5).map(".".join))
def test_accepted_names_are_exactly_the_host_of_the_console_url(host):
    """Whatever passes stays one host in the URL browsers open: nothing leaks into the
    scheme, port, path or query of the console URL."""
    if public_host_problem(host) is not None:
        assert host.rsplit(".", 1)[-1].isdigit()  # the only refusal for such names
        return
    url = console_url(host, 8443, True, "tok", None)
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.scheme) == (host, 8443, "https")
    assert parse_qs(parts.query)["host"] == [host]


def test_allow_lists_and_admission():
    nets = parse_allow(["127.0.0.1/32, 10.0.0.0/8", "2001:db8::/32"])
    assert format_networks(nets) == "127.0.0.1/32 10.0.0.0/8 2001:db8::/32"
    policy = policy_from_row(None, format_networks(nets))
    assert policy.admits("127.0.0.1") and policy.admits("10.9.8.7")
    assert policy.admits("::ffff:10.1.1.1")  # a dual-stack listener's IPv4 peer
    assert not policy.admits("127.0.0.2") and not policy.admits("2001:db9::1")
    assert not policy.admits(None) and not policy.admits("unknown")
    assert ProxyPolicy().admits(None) and ProxyPolicy().admits("203.0.113.9")
    assert parse_allow(["any"]) is None
    for bad in (["any", "10.0.0.0/8"], ["10.0.0.0/33"], ["evil.example"], [""]):
        with pytest.raises(ValueError):
            parse_allow(bad)


def test_capacity_is_clamped_to_the_ceiling():
    assert ProxyPolicy(max_capacity=5).clamp(10**7) == 5
    assert ProxyPolicy(max_capacity=5).clamp(3) == 3
    assert ProxyPolicy(max_capacity=0).clamp(100) == 0
    assert ProxyPolicy().clamp(10**7) == 10**7
    assert policy_from_row(7, None) == ProxyPolicy(7, None)
    assert isinstance(parse_allow(["::1"])[0], ipaddress.IPv6Network)
