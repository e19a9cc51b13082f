"""Two appliance images compared: the files, whole and region by region, then file by file.

``python3 -m tests.appliance.compare A.qcow2 B.qcow2`` prints the comparison as JSON. No
mount and no loop device (as the build): each image is converted to a raw disk, its
partitions are found with ``sfdisk --json``, and the root file system is unpacked with
``debugfs rdump`` (e2fsprogs reads it at the partition's offset). Each unpacked file is
then compared by type, content (SHA-256, or a symlink's target), mode, owner and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
# How many differing paths of each kind the report lists in full.
LISTED = 40


def sha256_file(path: Path, offset: int = 0, length: int | None = None) -> str:
    """SHA-256 of ``length`` bytes of ``path`` from ``offset`` (to the end without length)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            digest.update(chunk)
            if left is not None:
                left -= len(chunk)
    return digest.hexdigest()


@dataclass
class Entry:
    """One path of an unpacked root: what it is, and its metadata."""

    kind: str  # file, dir, link, other
    content: str  # SHA-256, a link's target, or ""
    mode: int
    owner: tuple[int, int]
    mtime: int


def scan(root: Path) -> dict[str, Entry]:
    """Every path under ``root`` (relative, with a leading /) and its :class:`Entry`."""
    entries: dict[str, Entry] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = path.lstat()
            mtime = int(info.st_mtime)
            if stat.S_ISLNK(info.st_mode):
                # rdump cannot date a symlink (utime follows it): its mtime is the unpack's.
                kind, content, mtime = "link", os.readlink(path), 0
            elif stat.S_ISREG(info.st_mode):
                kind, content = "file", sha256_file(path)
            elif stat.S_ISDIR(info.st_mode):
                kind, content = "dir", ""
            else:
                kind, content = "other", ""
            entries["/" + str(path.relative_to(root))] = Entry(
                kind,
                content,
                stat.S_IMODE(info.st_mode),
                (info.st_uid, info.st_gid),
                mtime,
            )
    return entries


@dataclass
class Comparison:
    """What differs between two images (empty lists: nothing of that kind)."""

    sha256: tuple[str, str]
    identical: bool
    regions: dict[str, bool] = field(default_factory=dict)  # region -> same bytes
    only_in_first: list[str] = field(default_factory=list)
    only_in_second: list[str] = field(default_factory=list)
    content_differs: list[str] = field(default_factory=list)
    metadata_differs: list[str] = field(default_factory=list)  # same content; mode/owner/mtime
    metadata_fields: dict[str, int] = field(default_factory=dict)  # field -> paths differing
    files: int = 0

    def summary(self) -> dict:
        """The comparison as JSON-ready data, each list cut to ``LISTED`` paths."""
        out: dict = {
            "sha256": list(self.sha256),
            "identical": self.identical,
            "regions_identical": self.regions,
            "files_compared": self.files,
        }
        for name in ("only_in_first", "only_in_second", "content_differs", "metadata_differs"):
            paths = getattr(self, name)
            out[name] = {"count": len(paths), "paths": paths[:LISTED]}
        out["metadata_differs"]["fields"] = self.metadata_fields
        return out


def partitions(raw: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of each partition of the raw disk ``raw``."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True
        ).stdout
    )
    return [
        (p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitiontable"]["partitions"]
    ]


def unpack_root(raw: Path, offset: int, into: Path) -> None:
    """``debugfs rdump`` of the ext4 file system at ``offset`` of ``raw`` into ``into``."""
    into.mkdir(parents=True)
    result = subprocess.run(
        ["debugfs", "-R", f"rdump / {into}", f"{raw}?offset={offset}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0 or not (into / "etc").is_dir():
        raise RuntimeError(f"debugfs rdump failed ({result.returncode}): {result.stderr[-2000:]}")


def compare_images(first: Path, second: Path, workdir: Path | None = None) -> Comparison:
    """Compare two qcow2 images; unpacks them (about 2 GB of scratch) when they differ."""
    sums = (sha256_file(first), sha256_file(second))
    result = Comparison(sums, sums[0] == sums[1])
    if result.identical:
        return result
    scratch = Path(tempfile.mkdtemp(prefix="cpvm-compare-", dir=workdir or "/var/tmp"))
    try:
        raws = [scratch / "first.raw", scratch / "second.raw"]
        for image, raw in zip((first, second), raws, strict=True):
            subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)],
                check=True,
                timeout=600,
            )
        layout = partitions(raws[0])
        if layout != partitions(raws[1]):
            result.regions["partition table"] = False
            return result
        boot_end = layout[0][0]
        regions = {"boot sectors and GRUB core": (0, boot_end)}
        regions.update({f"partition {i + 1}": part for i, part in enumerate(layout)})
        for name, (offset, length) in regions.items():
            result.regions[name] = sha256_file(raws[0], offset, length) == sha256_file(
                raws[1], offset, length
            )
        root_offset = layout[-1][0]
        trees = [scratch / "first", scratch / "second"]
        for raw, tree in zip(raws, trees, strict=True):
            unpack_root(raw, root_offset, tree)
            raw.unlink()  # the unpacked tree is all that is still needed
        _compare_trees(scan(trees[0]), scan(trees[1]), result)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare_trees(a: dict[str, Entry], b: dict[str, Entry], result: Comparison) -> None:
    result.files = len(set(a) | set(b))
    result.only_in_first = sorted(set(a) - set(b))
    result.only_in_second = sorted(set(b) - set(a))
    for path in sorted(set(a) & set(b)):
        x, y = a[path], b[path]
        if (x.kind, x.content) != (y.kind, y.content):
            result.content_differs.append(path)
        elif (x.mode, x.owner, x.mtime) != (y.mode, y.owner, y.mtime):
            result.metadata_differs.append(path)
            for name in ("mode", "owner", "mtime"):
                if getattr(x, name) != getattr(y, name):
                    result.metadata_fields[name] = result.metadata_fields.get(name, 0) + 1


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python3 -m tests.appliance.compare FIRST.qcow2 SECOND.qcow2", file=sys.stderr)
        return 2
    comparison = compare_images(Path(argv[0]), Path(argv[1]))
    print(json.dumps(comparison.summary(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
