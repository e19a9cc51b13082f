"""Both daemons' TLS listeners, checked by a real scanner (sslyze) as an auditor would.

The policy (cpvm/common/tls.py): TLS 1.2 or later only, forward-secret suites only (ECDHE/DHE in
TLS 1.2; every TLS 1.3 suite is), no TLS compression, no insecure renegotiation. sslyze
runs from its own venv (scripts/install-deps; it pins an older cryptography than cpvm
can use) against real ``twistd`` processes on 127.0.0.1, port 0.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.daemons import Daemon
from tests.peers import HOST, INSTALL_HINT

SSLYZE_PYTHON = Path(os.environ.get("CPVM_SSLYZE_VENV", "/opt/cpvm-sslyze")) / "bin" / "python"
# One scan command per protocol version, plus compression and renegotiation.
_VERSIONS = {
    "ssl_2_0": "--sslv2",
    "ssl_3_0": "--sslv3",
    "tls_1_0": "--tlsv1",
    "tls_1_1": "--tlsv1_1",
    "tls_1_2": "--tlsv1_2",
    "tls_1_3": "--tlsv1_3",
}
_FORBIDDEN_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")


def sslyze(port: int, out: Path) -> dict[str, Any]:
    """Scan ``HOST:port``; return sslyze's ``scan_result`` (its JSON output)."""
    if not SSLYZE_PYTHON.exists():
        pytest.fail(f"sslyze missing at {SSLYZE_PYTHON}: {INSTALL_HINT}", pytrace=False)
    argv = [
        str(SSLYZE_PYTHON),
        "-m",
        "sslyze",
        "--quiet",
        f"--json_out={out}",
        "--mozilla_config=disable",
        *_VERSIONS.values(),
        "--compression",
        "--reneg",
        f"{HOST}:{port}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"sslyze failed: {done.stdout}{done.stderr}"
    [server] = json.loads(out.read_text())["server_scan_results"]
    assert server["scan_status"] == "COMPLETED", server.get("connectivity_error_trace")
    return server["scan_result"]


def _result(scan: dict[str, Any], command: str) -> dict[str, Any]:
    entry = scan[command]
    assert entry["status"] == "COMPLETED", f"{command}: {entry.get('error_trace')}"
    return entry["result"]


def policy_violations(scan: dict[str, Any]) -> list[str]:
    """Every way the scanned listener departs from cpvm's TLS policy (empty: compliant)."""
    found = []
    accepted = {
        version: [
            c["cipher_suite"]["name"]
            for c in _result(scan, f"{version}_cipher_suites")["accepted_cipher_suites"]
        ]
        for version in _VERSIONS
    }
    for version in _FORBIDDEN_VERSIONS:
        if accepted[version]:
            found.append(f"{version} accepted: {accepted[version]}")
    if not accepted["tls_1_2"] and not accepted["tls_1_3"]:
        found.append("neither TLS 1.2 nor TLS 1.3 accepted")
    # TLS 1.2 names carry the key exchange; TLS 1.3 suites (TLS_AES_*, TLS_CHACHA20_*) do
    # not, and all of them are ephemeral (EC)DHE.
    not_fs = [
        name for name in accepted["tls_1_2"] if not name.startswith(("TLS_ECDHE_", "TLS_DHE_"))
    ]
    if not_fs:
        found.append(f"TLS 1.2 suites without forward secrecy: {not_fs}")
    if _result(scan, "tls_compression")["supports_compression"]:
        found.append("TLS compression supported")
    reneg = _result(scan, "session_renegotiation")
    if reneg["is_vulnerable_to_client_renegotiation_dos"]:
        found.append("client-initiated renegotiation accepted")
    if not reneg["supports_secure_renegotiation"] and reneg["client_renegotiations_success_count"]:
        found.append("insecure (legacy) renegotiation")
    return found


def test_policy_check_flags_weak_findings():
    """The checker itself: a scan with every weakness yields one finding per weakness."""

    def suites(*names):
        return {
            "status": "COMPLETED",
            "result": {"accepted_cipher_suites": [{"cipher_suite": {"name": n}} for n in names]},
        }

    weak = {f"{v}_cipher_suites": suites() for v in _VERSIONS}
    weak["tls_1_0_cipher_suites"] = suites("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA")
    weak["tls_1_2_cipher_suites"] = suites(
        "TLS_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
    )
    weak["tls_compression"] = {"status": "COMPLETED", "result": {"supports_compression": True}}
    weak["session_renegotiation"] = {
        "status": "COMPLETED",
        "result": {
            "supports_secure_renegotiation": False,
            "is_vulnerable_to_client_renegotiation_dos": True,
            "client_renegotiations_success_count": 3,
        },
    }
    found = policy_violations(weak)
    assert [f.split(" ")[0] for f in found] == [
        "tls_1_0",
        "TLS",
        "TLS",
        "client-initiated",
        "insecure",
    ]
    assert "TLS_RSA_WITH_AES_128_GCM_SHA256" in found[1]
    assert "ECDHE" not in found[1]


def _copy_pki(pki, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o600)
    return cert, key


@pytest_twisted.ensureDeferred
async def test_cpvm_tls_listener_passes_the_scanner(cpvm_factory, pki, tmp_path):
    cert, key = _copy_pki(pki, tmp_path / "tls")
    cpvm = cpvm_factory(server={"tls": "true", "certificate": cert, "private_key": key})
    scan = await threads.deferToThread(sslyze, cpvm.port, tmp_path / "cpvm-scan.json")
    found = policy_violations(scan)
    assert not found, "\n".join(found)
    # Still usable: the modern protocol versions are on offer.
    assert _result(scan, "tls_1_3_cipher_suites")["accepted_cipher_suites"]
    assert _result(scan, "tls_1_2_cipher_suites")["accepted_cipher_suites"]
    assert cpvm.alive()


@pytest_twisted.ensureDeferred
async def test_manager_tls_listener_passes_the_scanner(pki, tmp_path):
    cert, key = _copy_pki(pki, tmp_path / "tls")
    # As docs/operations.md configures it: an ssl: endpoint string.
    config = (
        f"[server]\nlisten = ssl:0:interface={HOST}:privateKey={key}:certKey={cert}\n"
        f"data_dir = {tmp_path / 'data'}\n"
    )
    (tmp_path / "manager").mkdir()
    manager = Daemon("cpvm-manager", "cpvm-manager", config, workdir=tmp_path / "manager")
    try:
        scan = await threads.deferToThread(sslyze, manager.port, tmp_path / "manager-scan.json")
        found = policy_violations(scan)
        assert not found, "\n".join(found)
        assert _result(scan, "tls_1_3_cipher_suites")["accepted_cipher_suites"]
        assert _result(scan, "tls_1_2_cipher_suites")["accepted_cipher_suites"]
        assert manager.alive()
    finally:
        manager.stop()
