"""cpvm.common.tls's server policy on in-memory TLS handshakes (the scanner test checks the daemons)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet import endpoints, reactor, ssl

from cpvm.common import tls
from tests import peers


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    pki = peers.make_test_ca(tmp_path_factory.mktemp("pki"))
    cert = ssl.PrivateCertificate.loadPEM(
        pki.server_key.read_bytes() + b"\n" + pki.server_cert.read_bytes()
    )
    return pki, lambda **kw: ssl.CertificateOptions(
        privateKey=cert.privateKey.original, certificate=cert.original, **kw
    )


def _pump(one: SSL.Connection, other: SSL.Connection) -> None:
    try:
        other.bio_write(one.bio_read(65536))
    except SSL.WantReadError:
        pass


def handshake(server_context: SSL.Context, client_context: SSL.Context) -> str:
    """Run a handshake in memory; the cipher agreed, or the SSL.Error raised."""
    server, client = SSL.Connection(server_context), SSL.Connection(client_context)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        _pump(client, server)
        _pump(server, client)
    return client.get_cipher_name() or "no handshake"


def client(max_version: int, ciphers: bytes = b"DEFAULT") -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(0)
    context.set_max_proto_version(max_version)
    context.set_cipher_list(ciphers)
    return context


def test_forward_secret_tls12_and_tls13_are_accepted(options):
    _, make = options
    context = tls.hardened(make().getContext())
    assert handshake(context, client(SSL.TLS1_2_VERSION)).startswith("ECDHE-")
    assert handshake(context, client(SSL.TLS1_3_VERSION)).startswith("TLS_")


def test_static_rsa_key_exchange_is_refused(options):
    _, make = options
    rsa_only = b"AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA"
    # Twisted's default list accepts it: the reason for the policy.
    assert handshake(make().getContext(), client(SSL.TLS1_2_VERSION, rsa_only)) != "no handshake"
    with pytest.raises(SSL.Error):
        handshake(tls.hardened(make().getContext()), client(SSL.TLS1_2_VERSION, rsa_only))


def test_tls11_is_refused_even_from_a_permissive_context(options):
    _, make = options

    def permissive():
        context = make(insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0).getContext()
        context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        return context

    old_client = client(SSL.TLS1_1_VERSION, b"DEFAULT:@SECLEVEL=0")
    assert handshake(permissive(), old_client) != "no handshake"  # the probe works
    with pytest.raises(SSL.Error):
        handshake(tls.hardened(permissive()), client(SSL.TLS1_1_VERSION, b"DEFAULT:@SECLEVEL=0"))


def test_policy_is_applied_once_and_compression_is_off(options):
    _, make = options
    context = make().getContext()
    assert tls.hardened(context) is context
    assert context.set_options(0) & SSL.OP_NO_COMPRESSION
    assert context.set_options(0) & SSL.OP_NO_RENEGOTIATION
    names = SSL.Connection(context).get_cipher_list()
    assert names and all(n.startswith(("ECDHE-", "DHE-", "TLS_")) for n in names), names


def test_server_endpoint_hardens_ssl_and_leaves_tcp_alone(options):
    pki, _ = options
    listen = f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
    endpoint = tls.server_endpoint(reactor, listen)
    assert isinstance(endpoint, endpoints.SSL4ServerEndpoint)
    rsa_only = client(SSL.TLS1_2_VERSION, b"AES128-GCM-SHA256")
    with pytest.raises(SSL.Error):
        handshake(endpoint._sslContextFactory.getContext(), rsa_only)
    assert isinstance(tls.server_endpoint(reactor, "tcp:0"), endpoints.TCP4ServerEndpoint)
