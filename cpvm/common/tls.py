"""TLS settings: cpvm's listening certificate (reloadable) and trust toward the manager."""

from __future__ import annotations

from pathlib import Path

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.error import VerifyError
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

    def _load_checked(self) -> ssl.CertificateOptions:
        """``_load``, with every way the files can be unusable as one ``TLSFilesError``."""
        cert_path, key_path, _ = self._paths
        try:
            options = self._load()
            options.getContext()  # built (and cached) now: a bad pair fails here, not per client
        except VerifyError:
            raise TLSFilesError(f"the private key {key_path} does not match the "
                                f"certificate {cert_path}") from None
        except OSError as e:
            raise TLSFilesError(f"cannot read {e.filename}: {e.strerror}") from None
        except (SSL.Error, crypto.Error, ValueError) as e:
            # OpenSSL's and the PEM loader's messages can quote file content: name the kind.
            raise TLSFilesError(f"{cert_path}, {key_path} or the chain is not a usable PEM "
                                f"certificate and key ({type(e).__name__})") from None
        return options

    def reload(self) -> bool:
        """Re-read the files (SIGHUP); on any problem keep serving the old pair."""
        try:
            self._options = self._load_checked()
        except TLSFilesError as e:
            self._log.error("TLS reload failed, keeping the old certificate: {why}",
                            why=str(e))
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
