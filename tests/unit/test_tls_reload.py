"""ReloadableServerTLS: a bad new certificate/key keeps the old pair, with a clear log line."""

from __future__ import annotations

import shutil

import pytest
from twisted.logger import Logger, formatEvent

from cpvm.common.tls import ReloadableServerTLS, TLSFilesError


@pytest.fixture
def files(pki, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copyfile(pki.server_cert, cert)
    shutil.copyfile(pki.server_key, key)
    return cert, key


@pytest.fixture
def tls(files, monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(ReloadableServerTLS, "_log", Logger(observer=events.append))
    t = ReloadableServerTLS(*files)
    t.events = events  # type: ignore[attr-defined]
    return t


def _certificate(tls) -> bytes:
    """The fingerprint of the certificate new connections get."""
    from cryptography.hazmat.primitives import hashes
    from OpenSSL import SSL

    local = SSL.Connection(tls.getContext(), None).get_certificate()
    return local.to_cryptography().fingerprint(hashes.SHA256())


GARBAGE = b"-----BEGIN PRIVATE KEY-----\nQUJD\n-----END PRIVATE KEY-----\n"


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("other key", "does not match the certificate"),
        ("garbage", "not a usable PEM"),
        ("empty", "not a usable PEM"),
    ],
)
def test_bad_key_keeps_the_old_pair_and_says_why(tls, files, pki, tmp_path, kind, reason):
    before = _certificate(tls)
    bad = {
        "other key": lambda: pki.issue_server_cert(tmp_path / "o").server_key.read_bytes(),
        "garbage": lambda: GARBAGE,
        "empty": lambda: b"",
    }[kind]()
    files[1].write_bytes(bad)
    assert tls.reload() is False
    assert _certificate(tls) == before
    (line,) = [formatEvent(e) for e in tls.events]
    assert line.startswith("TLS reload failed, keeping the old certificate: ")
    assert reason in line and str(files[1]) in line
    for secret_line in bad.splitlines()[1:-1]:
        assert secret_line.decode() not in line


def test_missing_file_and_then_a_good_pair(tls, files, pki, tmp_path):
    files[0].unlink()
    assert tls.reload() is False
    assert "cannot read" in formatEvent(tls.events[-1])
    renewed = pki.issue_server_cert(tmp_path / "renewed")
    shutil.copyfile(renewed.server_cert, files[0])
    shutil.copyfile(renewed.server_key, files[1])
    before = _certificate(tls)
    assert tls.reload() is True
    assert _certificate(tls) != before


def test_a_bad_pair_at_start_up_is_one_error(files, pki, tmp_path):
    files[1].write_bytes(pki.issue_server_cert(tmp_path / "o").server_key.read_bytes())
    with pytest.raises(TLSFilesError, match="does not match the certificate"):
        ReloadableServerTLS(*files)
