"""The appliance image for tests: built once with packaging/build-appliance, then cached.

The cache key is a hash of every input of the build (the .deb's sources and the appliance
files), so a second run with the same checkout boots the same image without building, and
any change to those files builds a new one. The cache lives in ``CPVM_APPLIANCE_CACHE``
(default ``/var/cache/cpvm-tests/appliance``); only the newest few images are kept.
``CPVM_APPLIANCE_IMAGE=PATH`` uses that image instead (no build, no hash: for working on
the tests themselves).

``cached_image("second")`` is another build of the same inputs (a second build of the
same commit, into its own directory), cached the same way under the key and the salt: the
tests boot it with the first image's config drive and compare the two
(``compare.py``). ``CPVM_APPLIANCE_SECOND_IMAGE=PATH`` gives it instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from tests.peers import REPO_ROOT

CACHE = Path(os.environ.get("CPVM_APPLIANCE_CACHE", "/var/cache/cpvm-tests/appliance"))
KEEP = 4  # two checkouts' first and second builds
# What the image is made of: the package's sources and the appliance's files. Docs count
# too (operations.md is in the .deb).
INPUTS = (
    "cpvm",
    "twisted/plugins/cpvm_plugin.py",
    "etc/cpvm",
    "systemd",
    "packaging",
    "docs/operations.md",
    "docs/management-api.md",
    "docs/appliance.md",
    "setup.cfg",
)
BUILD_TIMEOUT = 900


def input_files() -> list[Path]:
    files: list[Path] = []
    for name in INPUTS:
        path = REPO_ROOT / name
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        elif path.is_file():
            files.append(path)
    return sorted(files)


def input_hash() -> str:
    digest = hashlib.sha256()
    for path in input_files():
        digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0")
        digest.update(oct(path.stat().st_mode & 0o111).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    # The commit time dates the image (SOURCE_DATE_EPOCH).
    epoch = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%ct"], capture_output=True, text=True
    ).stdout.strip()
    digest.update(epoch.encode())
    return digest.hexdigest()[:16]


def cached_image(salt: str = "") -> Path:
    """The image for this checkout: from the cache, or built now (under a lock). A
    ``salt`` names another build of the same inputs, cached apart from the first."""
    given = os.environ.get("CPVM_APPLIANCE_SECOND_IMAGE" if salt else "CPVM_APPLIANCE_IMAGE")
    if given:
        return Path(given)
    key = input_hash() + (f"-{salt}" if salt else "")
    directory = CACHE / key
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = sorted(directory.glob("cpvm-appliance_*_amd64.qcow2"))
        if found:
            return found[0]
        scratch = CACHE / f".build-{key}"
        shutil.rmtree(scratch, ignore_errors=True)
        log = CACHE / f"build-{key}.log"
        with open(log, "wb") as out:
            result = subprocess.run(
                [str(REPO_ROOT / "packaging" / "build-appliance"), str(scratch)],
                stdout=subprocess.PIPE,
                stderr=out,
                timeout=BUILD_TIMEOUT,
            )
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"build-appliance failed ({result.returncode}):\n{tail}")
        image = Path(result.stdout.decode().strip().splitlines()[-1])
        scratch.rename(directory)
        _prune(keep=directory)
        return directory / image.name


def _prune(keep: Path) -> None:
    olds = sorted(
        (d for d in CACHE.iterdir() if d.is_dir() and not d.name.startswith(".") and d != keep),
        key=lambda d: d.stat().st_mtime,
        reverse=True,
    )
    for old in olds[KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)
