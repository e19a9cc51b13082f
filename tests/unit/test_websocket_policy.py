"""Origin allow-list and client-address resolution behind trusted proxies."""

import ipaddress

import pytest

from cpvm.common.addresses import client_address
from cpvm.proxy.websocket import origin_allowed

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"))


@pytest.mark.parametrize(
    "origin, host, allowed, expected",
    [
        ("http://cpvm.example:8080", "cpvm.example:8080", ("self",), True),
        ("HTTP://CPVM.example:8080/", "cpvm.example:8080", ("self",), True),
        ("http://evil.example", "cpvm.example:8080", ("self",), False),
        ("https://cpvm.example:8080", "cpvm.example:8080", ("self",), False),  # scheme differs
        ("https://dash.example", "cpvm.example", ("self", "https://dash.example"), True),
        ("https://dash.example", "cpvm.example", ("https://other.example",), False),
        ("https://anything", "cpvm.example", ("*",), True),
        ("null", "cpvm.example", ("self",), False),
        (None, "cpvm.example", ("self",), True),  # non-browser clients send no Origin
    ],
)
def test_origin_allowed(origin, host, allowed, expected):
    assert origin_allowed(origin, host, "http", allowed) is expected


def test_client_address_ignores_xff_from_untrusted_peer():
    assert client_address("203.0.113.9", "1.2.3.4", NETS) == "203.0.113.9"
    assert client_address("10.1.1.1", "1.2.3.4", ()) == "10.1.1.1"


def test_client_address_takes_rightmost_untrusted_hop():
    assert client_address("10.1.1.1", "6.6.6.6, 1.2.3.4", NETS) == "1.2.3.4"
    assert client_address("10.1.1.1", "6.6.6.6, 1.2.3.4, 10.9.9.9", NETS) == "1.2.3.4"
    assert client_address("192.0.2.1", "2001:db8::1", NETS) == "2001:db8::1"


def test_client_address_refuses_garbled_header():
    assert client_address("10.1.1.1", "1.2.3.4, <script>", NETS) == "10.1.1.1"


def test_client_address_all_trusted_hops():
    assert client_address("10.1.1.1", "10.2.2.2, 10.3.3.3", NETS) == "10.2.2.2"


def test_addresses_match_networks_including_ipv4_mapped_peers():
    from cpvm.common.addresses import LOOPBACK, address_in, parse_networks

    assert address_in("127.0.0.1", LOOPBACK) and address_in("::1", LOOPBACK)
    assert address_in("::ffff:127.0.0.1", LOOPBACK)  # a dual-stack listener's peer
    assert not address_in("10.0.0.1", LOOPBACK)
    assert not address_in("unknown", LOOPBACK)
    assert address_in("203.0.113.9", parse_networks(["any"]))
    with pytest.raises(ValueError, match="'example.com' is not"):
        parse_networks(["example.com"])
