"""Build, install and purge the cpvm .deb: what the packaging test modules share.

The fixtures that use this (``deb``, ``installed``) live in ``conftest.py``; one build and
one installation serve every module of ``tests/packaging``, and ``test_purge_leaves_nothing``
(marked ``purges_package``) runs after all of them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_COMMAND = [str(REPO / "packaging" / "build-deb")]
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}


def run(
    argv: list[str], *, check: bool = True, timeout: float = 180, **kwargs
) -> subprocess.CompletedProcess:
    """Run a command, capturing text output; a failure (with ``check``) fails the test."""
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{shlex.join(argv)} exited with {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    return result


def require_root_and_tools() -> None:
    """Fail (never skip) when this machine cannot build, install and run the package."""
    if os.geteuid() != 0:
        pytest.fail("the packaging tests install a .deb: run them as root", pytrace=False)
    for tool in ("dpkg-deb", "apt-get", "runuser", "setpriv", "systemd-analyze"):
        if shutil.which(tool) is None:
            pytest.fail(
                f"{tool} not found: the packaging tests need Debian 12's dpkg, apt, "
                "util-linux and systemd",
                pytrace=False,
            )


def package_state() -> str:
    """dpkg's status of the cpvm package ("installed", "config-files", "not-installed")."""
    result = run(["dpkg-query", "-W", "-f=${db:Status-Status}", "cpvm"], check=False)
    return result.stdout.strip() if result.returncode == 0 else "not-installed"


def build() -> Path:
    """The .deb, built with the documented command."""
    require_root_and_tools()
    result = run(BUILD_COMMAND, cwd=REPO)
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.is_file(), f"build-deb printed {path}, which does not exist"
    return path


def install(deb: Path) -> None:
    """Install ``deb`` with apt (a previous copy purged first)."""
    if package_state() != "not-installed":
        purge()
    argv = ["apt-get", "install", "-y", "--no-install-recommends", str(deb)]
    result = run(argv, check=False, env=APT_ENV, timeout=600)
    if result.returncode != 0:
        # Stale package lists are the usual cause: refresh them once.
        run(["apt-get", "update", "-q"], env=APT_ENV, timeout=300)
        result = run(argv, check=False, env=APT_ENV, timeout=600)
    if result.returncode != 0:
        pytest.fail(
            "apt-get could not install the package (are Debian 12's apt registries "
            f"reachable?):\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )


def reinstall(deb: Path) -> subprocess.CompletedProcess:
    """Install ``deb`` over the installed copy (``dpkg -i``: prerm upgrade, unpack, postinst
    configure with the old version), as an upgrade does; its output, for postinst's notes."""
    return run(["dpkg", "-i", str(deb)], env=APT_ENV, timeout=300)


def purge() -> subprocess.CompletedProcess:
    """``apt-get purge cpvm``."""
    return run(["apt-get", "purge", "-y", "cpvm"], env=APT_ENV)
