"""The instance id file (cpvm/proxy/instance.py): kept, made, replaced, private."""

from __future__ import annotations

import json
import os
import stat

import pytest

from cpvm.proxy import instance
from cpvm.proxy.instance import (
    INSTANCE_ENV,
    INSTANCE_FILE,
    instance_id_for,
    load_instance_id,
    read_machine_id,
)

MACHINE_A = "0123456789abcdef0123456789abcdef"
MACHINE_B = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def machine(tmp_path):
    path = tmp_path / "machine-id"
    path.write_text(MACHINE_A + "\n")
    return path


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_file_is_made_private_and_then_kept(tmp_path, machine):
    state = tmp_path / "state" / "cpvm"  # made, parents too
    first = load_instance_id(state, machine)
    assert instance.valid_instance_id(first)
    path = state / INSTANCE_FILE
    assert _mode(path) == 0o600
    assert json.loads(path.read_text()) == {"instance_id": first, "machine_id": MACHINE_A}
    assert load_instance_id(state, machine) == first  # a restart is the same instance
    assert [p.name for p in state.iterdir()] == [INSTANCE_FILE]  # no temporary file left


def test_file_is_0600_whatever_the_umask(tmp_path, machine):
    old = os.umask(0)
    try:
        load_instance_id(tmp_path, machine)
    finally:
        os.umask(old)
    assert _mode(tmp_path / INSTANCE_FILE) == 0o600


def test_a_too_open_file_is_made_private(tmp_path, machine):
    first = load_instance_id(tmp_path, machine)
    (tmp_path / INSTANCE_FILE).chmod(0o644)
    assert load_instance_id(tmp_path, machine) == first
    assert _mode(tmp_path / INSTANCE_FILE) == 0o600


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"[]",
        b'{"instance_id": "short"}',
        b'{"machine_id": "x"}',
        b'{"instance_id": "' + b"g" * 32 + b'"}',
        b"\xff\xfe",
        b"{" + b" " * 5000 + b"}",
        b'{"instance_id": "0123456789abcdef0123456789abcdef", "machine_id": 7}',
    ],
)
def test_corrupt_file_is_replaced(tmp_path, machine, content):
    (tmp_path / INSTANCE_FILE).write_bytes(content)
    new = load_instance_id(tmp_path, machine)
    assert instance.valid_instance_id(new)
    assert json.loads((tmp_path / INSTANCE_FILE).read_text())["instance_id"] == new
    assert _mode(tmp_path / INSTANCE_FILE) == 0o600


def test_another_machine_id_makes_a_new_instance(tmp_path, machine):
    first = load_instance_id(tmp_path, machine)
    machine.write_text(MACHINE_B + "\n")  # a clone booted: systemd gave it a new machine id
    second = load_instance_id(tmp_path, machine)
    assert second != first
    assert json.loads((tmp_path / INSTANCE_FILE).read_text())["machine_id"] == MACHINE_B
    assert load_instance_id(tmp_path, machine) == second


def test_no_machine_id_keeps_the_instance(tmp_path, machine):
    first = load_instance_id(tmp_path, machine)
    missing = tmp_path / "no-machine-id"
    assert read_machine_id(missing) is None
    # Nothing to compare with (a container): the recorded id stays.
    assert load_instance_id(tmp_path, missing) == first
    # Made without one, then the host gets one (first boot): a new id, recording it.
    other = tmp_path / "other"
    made = load_instance_id(other, missing)
    assert json.loads((other / INSTANCE_FILE).read_text())["machine_id"] is None
    assert load_instance_id(other, machine) != made


@pytest.mark.parametrize("text", ["", "uninitialized\n", "xyz", MACHINE_A.upper()])
def test_unusable_machine_id_reads_as_none(tmp_path, text):
    path = tmp_path / "machine-id"
    path.write_text(text)
    assert read_machine_id(path) is None


def test_a_file_in_place_of_the_directory_is_an_oserror(tmp_path, machine):
    (tmp_path / "state").write_text("x")
    with pytest.raises(OSError):
        load_instance_id(tmp_path / "state", machine)


def test_workers_take_the_first_process_id(tmp_path, machine, monkeypatch):
    monkeypatch.delenv(INSTANCE_ENV, raising=False)
    first = instance_id_for(tmp_path, None, machine)
    assert os.environ[INSTANCE_ENV] == first  # what spawned workers inherit
    # A worker never writes: a different file now would not change its id.
    (tmp_path / INSTANCE_FILE).unlink()
    assert instance_id_for(tmp_path, 3, machine) == first
    assert not (tmp_path / INSTANCE_FILE).exists()
    monkeypatch.delenv(INSTANCE_ENV)
    with pytest.raises(OSError):
        instance_id_for(tmp_path, 3, machine)  # nobody gave it one, no file to read
