"""TLS settings: cpvm's listening certificate (reloadable) and trust toward the manager."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.logger import Logger
from twisted.web.client import BrowserLikePolicyForHTTPS


def pem_certificates(data: bytes) -> list[ssl.Certificate]:
    """Every certificate in a PEM bundle, in order."""
    end = b"-----END CERTIFICATE-----"
    certs = []
    for block in data.split(end)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            certs.append(ssl.Certificate.loadPEM(block[start:] + end + b"\n"))
    return certs


class ReloadableServerTLS:
    """A server context factory whose certificate and key can be re-read (SIGHUP).

    New connections get the new certificate; established ones keep their context, so a
    renewal drops no session. A bad new file keeps the old certificate in service.
    """

    _log = Logger()

    def __init__(self, certificate: Path, private_key: Path, chain: Path | None = None):
        self._paths = (certificate, private_key, chain)
        self._options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        cert_path, key_path, chain_path = self._paths
        cert = ssl.PrivateCertificate.loadPEM(
            key_path.read_bytes() + b"\n" + cert_path.read_bytes())
        chain = []
        if chain_path is not None:
            chain = [c.original for c in pem_certificates(chain_path.read_bytes())]
        return ssl.CertificateOptions(
            privateKey=cert.privateKey.original,
            certificate=cert.original,
            extraCertChain=chain or None,
            raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        )

    def reload(self) -> bool:
        try:
            self._options = self._load()
        except (OSError, SSL.Error, ValueError) as e:
            self._log.error("TLS reload failed, keeping the old certificate: {why}",
                            why=type(e).__name__)
            return False
        self._log.info("TLS certificate reloaded from {path}", path=str(self._paths[0]))
        return True

    def getContext(self):  # noqa: N802 (Twisted's interface)
        return self._options.getContext()


def manager_tls_policy(ca_file: Path | None):
    """Verify the manager's certificate against ``ca_file`` (or the system's CAs)."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    certs = pem_certificates(ca_file.read_bytes())
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(certs))
