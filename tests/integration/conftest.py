"""Fixtures for cpvm's integration tests: a real cpvm process and a contract manager."""

from __future__ import annotations

import secrets

import pytest

from tests.daemons import cpvm_config, start_cpvm
from tests.integration.contract_manager import start_contract_manager


@pytest.fixture
def proxy_key(tmp_path):
    key = f"cpvmk_test.{secrets.token_urlsafe(24)}"
    path = tmp_path / "proxy.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key, path


@pytest.fixture
def manager(proxy_key):
    m = start_contract_manager(proxy_key[0])
    yield m
    m.port.stopListening()


@pytest.fixture
def cpvm_factory(manager, proxy_key, tmp_path):
    """Start cpvm processes with extra settings; all are stopped after the test."""
    started = []

    def start(**sections):
        workdir = tmp_path / f"cpvm{len(started)}"
        # Each its own instance id (cpvm/proxy/instance.py), never in /var/lib/cpvm.
        sections["server"] = {"state_directory": workdir / "state", **sections.get("server", {})}
        text = cpvm_config(manager.url, credential_file=proxy_key[1], **sections)
        # As the systemd unit runs it: our log observer applies [log] format and level.
        daemon = start_cpvm(
            text, workdir=workdir, extra_args=("--logger=cpvm.common.logs.observer",)
        )
        started.append(daemon)
        return daemon

    (tmp_path / "cpvm0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"cpvm{i}").mkdir()
    yield start
    for daemon in started:
        daemon.stop()
    # Log audit: no token, VNC password or proxy key in any line cpvm wrote.
    secrets_used = [proxy_key[0]] + list(manager.tokens)
    secrets_used += [i.vnc["password"] for i in manager.tokens.values() if i.vnc.get("password")]
    for daemon in started:
        text = daemon.log_text()
        leaked = [s[:6] + "…" for s in secrets_used if s and s in text]
        assert not leaked, f"secrets in {daemon.log_path}: {leaked}"


@pytest.fixture
def cpvm(cpvm_factory):
    return cpvm_factory()
