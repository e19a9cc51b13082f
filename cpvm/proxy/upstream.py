"""The Twisted VNC client protocol: a thin shell around ``RfbClientHandshake``.

The protocol moves bytes between the TCP (or VeNCrypt TLS) transport and the handshake
state machine, then hands every later byte to its session unchanged.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol as TypingProtocol
from typing import cast

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from cpvm import rfb
from cpvm.common.tls import pem_certificates
from cpvm.proxy import fastwrite
from cpvm.proxy.manager_client import VncTarget

MAX_HANDSHAKE_BYTES = 256 * 1024


class UpstreamListener(TypingProtocol):
    """What the VNC client protocol reports to (a ``ConsoleSession``)."""

    def upstream_connected(self, upstream: "VncClientProtocol") -> None: ...
    def upstream_security_complete(self) -> None: ...
    def upstream_server_init(self, server_init: rfb.ServerInit, leftover: bytes) -> None: ...
    def upstream_data(self, data: bytes) -> None: ...
    def upstream_failed(self, kind: str, message: str) -> None: ...
    def upstream_lost(self, reason: str) -> None: ...


@implementer(IOpenSSLClientConnectionCreator)
class _AnonymousTLS:
    """VeNCrypt TLSVnc/TLSNone: anonymous Diffie-Hellman, no server certificate at all.

    Only used when the manager says ``tls = anonymous`` and cpvm's configuration allows it.
    """

    def __init__(self) -> None:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(b"aNULL:!eNULL:@SECLEVEL=0")
        self._ctx = ctx

    def clientConnectionForTLS(self, tlsProtocol):  # noqa: N802 (Twisted's name)
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        return conn


def tls_creator(target: VncTarget, default_ca_pem: bytes | None, anonymous: bool):
    """The TLS client settings for a VeNCrypt upgrade toward ``target``."""
    if anonymous:
        return _AnonymousTLS()
    ca_pem = target.ca_pem or default_ca_pem
    if not ca_pem:
        raise ValueError("no CA to verify the VNC server's certificate with")
    certs = pem_certificates(ca_pem)
    if not certs:
        raise ValueError("the CA bundle holds no certificate")
    trust = ssl.trustRootFromCertificates(certs)
    return ssl.optionsForClientTLS(target.server_name or target.host, trustRoot=trust)


class VncClientProtocol(Protocol):
    """Speaks RFB to the VM's VNC server on behalf of one console session."""

    def __init__(self, listener: UpstreamListener, handshake: rfb.RfbClientHandshake, tls_factory):
        self._listener = listener
        self._handshake: rfb.RfbClientHandshake | None = handshake
        self._tls_factory = tls_factory
        self._relaying = False
        self._closing = False
        self._handshake_bytes = 0

    def connectionMade(self) -> None:  # noqa: N802
        self._listener.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._relaying:
            self._listener.upstream_data(data)
            return
        if self._handshake is None:
            return
        # A handshake is a few hundred bytes (reason strings and the desktop name are
        # capped at 64 KiB each); a server that sends more is broken or hostile.
        self._handshake_bytes += len(data)
        if self._handshake_bytes > MAX_HANDSHAKE_BYTES:
            self._handshake = None
            self._listener.upstream_failed(
                "protocol", f"VNC server sent over {MAX_HANDSHAKE_BYTES} bytes in its handshake"
            )
            self.close()
            return
        self._handle(self._handshake.receive(data))

    def send_client_init(self, shared: bool) -> None:
        assert self._handshake is not None
        self._handle(self._handshake.send_client_init(shared))

    def write(self, data: bytes) -> None:
        fastwrite.write(self.transport, data)

    def close(self) -> None:
        """Close the VNC connection, dropping anything still queued for it.

        The session is over at this point: waiting for a VNC server that stopped reading
        would leak the socket (CloudStack's proxy does).
        """
        if not self._closing and self.transport is not None:
            self._closing = True
            cast(ITCPTransport, self.transport).abortConnection()

    def _handle(self, events: list) -> None:
        for event in events:
            if isinstance(event, rfb.Send):
                fastwrite.write(self.transport, event.data)
            elif isinstance(event, rfb.StartTLS):
                self._start_tls(event.anonymous)
            elif isinstance(event, rfb.SecurityComplete):
                self._listener.upstream_security_complete()
            elif isinstance(event, rfb.ServerInitReceived):
                self._relaying = True
                self._handshake = None
                self._listener.upstream_server_init(event.server_init, event.leftover)
            elif isinstance(event, rfb.Failed):
                self._handshake = None
                self._listener.upstream_failed(event.kind, event.message)
                self.close()
                return

    def _start_tls(self, anonymous: bool) -> None:
        try:
            creator = self._tls_factory(anonymous)
        except ValueError as e:
            self._handshake = None
            self._listener.upstream_failed("unsupported-security", str(e))
            self.close()
            return
        cast(ITLSTransport, self.transport).startTLS(creator)
        assert self._handshake is not None
        self._handle(self._handshake.tls_started())

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self._listener.upstream_lost(_describe(reason))


def _describe(reason: Failure | None) -> str:
    if reason is None:
        return "connection closed"
    err = reason.value
    if isinstance(err, SSL.Error):
        return "TLS error: certificate verification or negotiation failed"
    return type(err).__name__


class VncClientFactory(ClientFactory):
    """Builds the protocol of one upstream connection."""

    noisy = False

    def __init__(self, listener: UpstreamListener, handshake: rfb.RfbClientHandshake, tls_factory):
        self._listener = listener
        self._handshake = handshake
        self._tls_factory = tls_factory

    def buildProtocol(self, addr):  # noqa: N802
        return VncClientProtocol(self._listener, self._handshake, self._tls_factory)


def vnc_endpoint(reactor, host: str, port: int, timeout: float):
    """The endpoint of a VNC server: an address connects directly; only a name goes
    through the resolver (a thread)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
