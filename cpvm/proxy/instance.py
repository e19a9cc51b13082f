"""cpvm's instance id: who this running proxy is, across its restarts.

Two cpvm instances holding one proxy key (a cloned appliance, two hosts booted from one
config drive) must not both act as that proxy: the manager binds the key to one live
instance and refuses the other (``docs/management-api.md``). The id is random, kept in
``<[server] state_directory>/instance-id`` so a restart (or a crash) is the same instance,
and regenerated when the file was written on another machine: the host's machine id
(``/etc/machine-id``) is recorded next to it, and a clone gets a new machine id at its
first boot.

Only the first process of an instance reads or writes the file, before it starts its
workers, and hands the id down to them (``INSTANCE_ENV``): workers never race for it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from twisted.logger import Logger

INSTANCE_FILE = "instance-id"
MACHINE_ID_PATH = Path("/etc/machine-id")
# How the first process tells its worker processes the id (they inherit its environment).
INSTANCE_ENV = "CPVM_INSTANCE_ID"
_ID = re.compile(r"^[0-9a-f]{32}$")
# systemd's machine-id(5): 32 lowercase hex digits ("uninitialized" during early boot).
_MACHINE_ID = re.compile(r"^[0-9a-f]{32}$")

_log = Logger(namespace="cpvm.proxy.instance")


def valid_instance_id(value: object) -> bool:
    """Whether ``value`` is an instance id as cpvm writes them (32 hex digits)."""
    return isinstance(value, str) and bool(_ID.match(value))


def read_machine_id(path: Path = MACHINE_ID_PATH) -> str | None:
    """The host's machine id, or None when the file is missing, unreadable or not one
    (containers often have none: then a copied state directory cannot be detected)."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _MACHINE_ID.match(text) else None


def _read_record(path: Path) -> dict | None:
    """The file's record, or None when missing; ``ValueError`` when corrupt."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) > 4096:
        raise ValueError("larger than 4096 bytes")
    record = json.loads(raw.decode("utf-8"))
    if not isinstance(record, dict) or not valid_instance_id(record.get("instance_id")):
        raise ValueError("no valid instance_id")
    machine = record.get("machine_id")
    if machine is not None and not isinstance(machine, str):
        raise ValueError("machine_id is not a string")
    return record


def _write_record(directory: Path, instance_id: str, machine_id: str | None) -> None:
    """Atomically (temporary file, fsync, rename) and private (0600) from the start."""
    path = directory / INSTANCE_FILE
    tmp = directory / f".{INSTANCE_FILE}.{os.getpid()}.tmp"
    data = json.dumps({"instance_id": instance_id, "machine_id": machine_id}).encode() + b"\n"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask or a stale file said
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_instance_id(directory: Path, machine_id_path: Path = MACHINE_ID_PATH) -> str:
    """This instance's id from ``directory``: created when missing or corrupt, replaced
    when it records another machine id than the host's. ``OSError`` when the directory
    cannot be created, read or written (the caller names the setting)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / INSTANCE_FILE
    machine = read_machine_id(machine_id_path)
    try:
        record = _read_record(path)
    except (ValueError, UnicodeDecodeError) as e:
        _log.warn(
            "instance id file {path} is unusable ({why}): making a new instance id",
            path=str(path),
            why=str(e),
        )
        record = None
    if record is not None:
        recorded = record.get("machine_id")
        # An unreadable machine id tells nothing: keep the id rather than change it at
        # every start.
        if machine is None or recorded == machine:
            if os.stat(path).st_mode & 0o077:
                os.chmod(path, 0o600)
            return str(record["instance_id"])
        _log.warn(
            "instance id file {path} was written on another machine (machine id "
            "changed: a cloned host?): making a new instance id",
            path=str(path),
        )
    instance_id = secrets.token_hex(16)
    _write_record(directory, instance_id, machine)
    _log.info("new cpvm instance id {instance} in {path}", instance=instance_id, path=str(path))
    return instance_id


def instance_id_for(
    directory: Path, worker: int | None, machine_id_path: Path = MACHINE_ID_PATH
) -> str:
    """The id for this process: the first process loads it (and publishes it in the
    environment its workers inherit); a worker takes the one it was given."""
    if worker is not None:
        given = os.environ.get(INSTANCE_ENV)
        if valid_instance_id(given):
            return str(given)
        # Started by hand, not by a first process: read (never race to write) the file.
        try:
            record = _read_record(directory / INSTANCE_FILE)
        except (ValueError, UnicodeDecodeError) as e:
            raise OSError(f"{directory / INSTANCE_FILE} is unusable: {e}") from None
        if record is None:
            raise OSError(f"no {INSTANCE_FILE} in {directory} and no {INSTANCE_ENV}")
        return str(record["instance_id"])
    instance_id = load_instance_id(directory, machine_id_path)
    os.environ[INSTANCE_ENV] = instance_id
    return instance_id
