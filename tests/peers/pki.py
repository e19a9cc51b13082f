"""A test X509 PKI made with ``cryptography``: a CA and server leaves, in the directory
layout QEMU's ``tls-creds-x509`` reads."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from tests.peers.processes import INSTALL_HINT, PeerUnavailable, write_private


@dataclasses.dataclass(frozen=True)
class TestPki:
    """A CA and a server certificate, as PEM files in one directory.

    The layout is QEMU's ``tls-creds-x509`` dir: ``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem`` (plus ``ca-key.pem``). ``issue_server_cert`` signs another leaf with
    the same CA (certificate rotation, expired or wrong-name certificates); ``other_ca`` makes
    an unrelated CA with its own leaf ("wrong CA" tests).
    """

    __test__ = False  # not a pytest test class despite the name

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hostnames: tuple[str, ...]

    @property
    def ca_cert_pem(self) -> bytes:
        return self.ca_cert.read_bytes()

    def issue_server_cert(
        self,
        dir: Path,
        hostnames: Iterable[str] | None = None,
        *,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> "TestPki":
        """Sign a new server leaf with this CA into *dir* (same layout, CA files copied)."""
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        names = tuple(hostnames) if hostnames is not None else self.hostnames
        ca_key = _load_key(self.ca_key)
        ca_cert = _load_cert(self.ca_cert)
        shutil.copyfile(self.ca_cert, dir / "ca-cert.pem")
        shutil.copyfile(self.ca_key, dir / "ca-key.pem")
        os.chmod(dir / "ca-key.pem", 0o600)
        _write_leaf(dir, ca_cert, ca_key, names, not_before, not_after)
        return _pki_in(dir, names)

    def other_ca(self, dir: Path, hostnames: Iterable[str] | None = None) -> "TestPki":
        """A brand-new, unrelated CA (and leaf for the same names) in *dir*."""
        return make_test_ca(dir, tuple(hostnames) if hostnames is not None else self.hostnames)


def _load_key(path: Path):  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _load_cert(path: Path):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes())


def _new_key():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives.asymmetric import rsa

    # RSA: what every VeNCrypt peer (GnuTLS in QEMU and TigerVNC, OpenSSL) handles.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write_key(path: Path, key) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization

    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


def _san(hostnames: Sequence[str]):  # type: ignore[no-untyped-def]
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(names)


def _write_leaf(  # type: ignore[no-untyped-def]
    dir, ca_cert, ca_key, hostnames, not_before, not_after
) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(hours=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(hostnames), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (dir / "server-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(dir / "server-key.pem", key)


def _pki_in(dir: Path, hostnames: tuple[str, ...]) -> TestPki:
    return TestPki(
        dir=dir,
        ca_cert=dir / "ca-cert.pem",
        ca_key=dir / "ca-key.pem",
        server_cert=dir / "server-cert.pem",
        server_key=dir / "server-key.pem",
        hostnames=hostnames,
    )


def make_test_ca(dir: Path, hostnames: Sequence[str] = ("127.0.0.1", "localhost")) -> TestPki:
    """Create a CA and a server leaf for *hostnames* in *dir* with ``cryptography``.

    The leaf has CA:FALSE, serverAuth and a SAN with each hostname (IPs as IP entries);
    QEMU refuses a self-signed CA:TRUE server certificate, hence the two-level chain.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise PeerUnavailable(f"python 'cryptography' missing: {INSTALL_HINT}") from None
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    hostnames = tuple(hostnames)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cpvm tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cpvm test CA {os.urandom(4).hex()}"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (dir / "ca-cert.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(dir / "ca-key.pem", ca_key)
    _write_leaf(dir, ca_cert, ca_key, hostnames, None, None)
    return _pki_in(dir, hostnames)
