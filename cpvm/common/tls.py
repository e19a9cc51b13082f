"""TLS settings: cpvm's listening certificate (reloadable) and trust toward the manager."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import endpoints, ssl
from twisted.internet.error import VerifyError
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS

#: The TLS 1.2 suites both daemons' listeners accept: forward-secret key exchange (ECDHE,
#: DHE) with AEAD only. TLS 1.3 suites are all forward-secret and are left to OpenSSL.
#: Twisted's default list also admits static-RSA key exchange (TLS_RSA_WITH_*), which lets a
#: stolen private key decrypt recorded sessions; tests/integration/test_tls_scan.py checks
#: the result with a real scanner.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!PSK:!SRP"

# Contexts already hardened: a listener asks for its context on every connection.
_hardened: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def hardened(context: SSL.Context) -> SSL.Context:
    """Apply cpvm's server TLS policy to ``context`` (once) and return it.

    TLS 1.2 at least (SSLv2/3, TLS 1.0/1.1 refused), :data:`SERVER_CIPHERS` for TLS 1.2,
    no compression (CRIME), no client-initiated renegotiation; the server's suite order wins.
    """
    if context not in _hardened:
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(SERVER_CIPHERS.encode("ascii"))
        context.set_options(
            SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
        )
        _hardened.add(context)
    return context


class HardenedContextFactory:
    """Wraps a server context factory so that every context it gives is :func:`hardened`."""

    def __init__(self, inner: Any):
        self._inner = inner

    def getContext(self) -> SSL.Context:  # noqa: N802 (Twisted's interface)
        return hardened(self._inner.getContext())


def server_endpoint(reactor: Any, description: str) -> Any:
    """``endpoints.serverFromString``, with an ``ssl:`` listener's TLS :func:`hardened`.

    Twisted's ``ssl:`` parser builds its CertificateOptions with Twisted's default cipher
    list and offers no way to pass ours, so its context factory is wrapped after parsing.
    """
    endpoint = endpoints.serverFromString(reactor, description)
    if isinstance(endpoint, endpoints.SSL4ServerEndpoint):
        endpoint._sslContextFactory = HardenedContextFactory(endpoint._sslContextFactory)
    return endpoint


def pem_certificates(data: bytes) -> list[ssl.Certificate]:
    """Every certificate in a PEM bundle, in order."""
    end = b"-----END CERTIFICATE-----"
    certs = []
    for block in data.split(end)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            certs.append(ssl.Certificate.loadPEM(block[start:] + end + b"\n"))
    return certs


class TLSFilesError(Exception):
    """The certificate, key or chain files cannot be used together. The message names the
    files and the reason, never their content."""


class ReloadableServerTLS:
    """A server context factory whose certificate and key can be re-read (SIGHUP).

    New connections get the new certificate; established ones keep their context, so a
    renewal drops no session. A bad new file keeps the old certificate in service.
    """

    _log = Logger()

    def __init__(self, certificate: Path, private_key: Path, chain: Path | None = None):
        self._paths = (certificate, private_key, chain)
        self._options = self._load_checked()

    def _load(self) -> ssl.CertificateOptions:
        cert_path, key_path, chain_path = self._paths
        cert = ssl.PrivateCertificate.loadPEM(
            key_path.read_bytes() + b"\n" + cert_path.read_bytes()
        )
        chain = []
        if chain_path is not None:
            chain = [c.original for c in pem_certificates(chain_path.read_bytes())]
        return ssl.CertificateOptions(
            privateKey=cert.privateKey.original,
            certificate=cert.original,
            extraCertChain=chain or None,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )

    def _load_checked(self) -> ssl.CertificateOptions:
        """``_load``, with every way the files can be unusable as one ``TLSFilesError``."""
        cert_path, key_path, _ = self._paths
        try:
            options = self._load()
            options.getContext()  # built (and cached) now: a bad pair fails here, not per client
        except VerifyError:
            raise TLSFilesError(
                f"the private key {key_path} does not match the certificate {cert_path}"
            ) from None
        except OSError as e:
            raise TLSFilesError(f"cannot read {e.filename}: {e.strerror}") from None
        except (SSL.Error, crypto.Error, ValueError) as e:
            # OpenSSL's and the PEM loader's messages can quote file content: name the kind.
            raise TLSFilesError(
                f"{cert_path}, {key_path} or the chain is not a usable PEM "
                f"certificate and key ({type(e).__name__})"
            ) from None
        return options

    def reload(self) -> bool:
        """Re-read the files (SIGHUP); on any problem keep serving the old pair."""
        try:
            self._options = self._load_checked()
        except TLSFilesError as e:
            self._log.error("TLS reload failed, keeping the old certificate: {why}", why=str(e))
            return False
        self._log.info("TLS certificate reloaded from {path}", path=str(self._paths[0]))
        return True

    def getContext(self):  # noqa: N802 (Twisted's interface)
        return hardened(self._options.getContext())


def manager_tls_policy(ca_file: Path | None):
    """Verify the manager's certificate against ``ca_file`` (or the system's CAs)."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    certs = pem_certificates(ca_file.read_bytes())
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(certs))
