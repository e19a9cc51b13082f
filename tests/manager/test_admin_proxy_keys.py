"""``cpvm-manager-admin proxy-key``: ``create --output`` makes a new 0600 file and nothing
else; ``create|update --max-capacity/--allow`` set the key's limits, or say why not."""

from __future__ import annotations

import io
import os
import stat

import pytest

from cpvm.manager import admin


@pytest.fixture
def run(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text(f"[server]\ndata_dir = {tmp_path}/data\n")

    def run(*args):
        out = io.StringIO()
        return admin.main(["--config", str(conf), *args], out=out), out.getvalue()

    return run


def _proxy_names(run) -> list[str]:
    import json

    status, out = run("--json", "proxy", "list")
    assert status == 0
    return [p["name"] for p in json.loads(out)]


def test_output_is_a_new_file_with_mode_0600(run, tmp_path):
    old = os.umask(0o022)  # the admin's usual umask would give 0644
    try:
        status, out = run("proxy-key", "create", "--name", "p1", "-o", str(tmp_path / "k"))
    finally:
        os.umask(old)
    assert status == 0 and "cpvmk_" not in out
    mode = stat.S_IMODE((tmp_path / "k").stat().st_mode)
    assert mode == 0o600
    assert (tmp_path / "k").read_text().startswith("cpvmk_")


def test_existing_file_is_refused_and_left_alone(run, tmp_path, capsys):
    target = tmp_path / "existing"
    target.write_text("someone else's data\n")
    target.chmod(0o644)
    status, _ = run("proxy-key", "create", "--name", "p1", "--output", str(target))
    assert status == 1
    assert "already exists" in capsys.readouterr().err
    assert target.read_text() == "someone else's data\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # no key into a world-readable file
    assert _proxy_names(run) == []  # and no key left behind in the database


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_is_not_followed(run, tmp_path, capsys, dangling):
    victim = tmp_path / "victim"
    if not dangling:
        victim.write_text("precious\n")
    link = tmp_path / "link"
    link.symlink_to(victim)
    status, _ = run("proxy-key", "create", "--name", "p1", "--output", str(link))
    assert status == 1
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink()
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_text() == "precious\n"
    assert _proxy_names(run) == []


def test_name_conflict_removes_the_new_file(run, tmp_path):
    assert run("proxy-key", "create", "--name", "p1")[0] == 0
    status, _ = run("proxy-key", "create", "--name", "p1", "-o", str(tmp_path / "k2"))
    assert status == 1
    assert not (tmp_path / "k2").exists()


def test_limits_set_listed_and_refused_with_reasons(run, capsys):
    import json

    assert (
        run(
            "proxy-key",
            "create",
            "--name",
            "p1",
            "--max-capacity",
            "10",
            "--allow",
            "10.0.0.0/8,192.0.2.7",
            "2001:db8::/32",
        )[0]
        == 0
    )
    status, out = run("proxy", "list")
    assert status == 0 and "10.0.0.0/8 192.0.2.7/32 2001:db8::/32" in out
    assert "max_capacity" in out.splitlines()[0] and "allow" in out.splitlines()[0]
    status, out = run("proxy-key", "update", "p1", "--no-max-capacity")
    assert status == 0 and "max capacity -" in out
    (listed,) = json.loads(run("--json", "proxy", "list")[1])
    assert listed["max_capacity"] is None and listed["allow"].startswith("10.0.0.0/8")
    capsys.readouterr()
    for args, reason in (
        (["update", "p1"], "nothing to change"),
        (["update", "p1", "--max-capacity", "3", "--no-max-capacity"], "not both"),
        (["update", "p1", "--allow", "10.0.0.0/33"], "--allow"),
        (["update", "p1", "--allow", "any", "10.0.0.0/8"], "cannot be combined"),
        (["update", "nosuch", "--max-capacity", "3"], "no active proxy key"),
        (["create", "--name", "p2", "--allow", "evil.example"], "--allow"),
    ):
        assert run("proxy-key", *args)[0] == 1, args
        assert reason in capsys.readouterr().err, args
    for bad in ("-1", "10000001", "many"):
        with pytest.raises(SystemExit):
            run("proxy-key", "update", "p1", "--max-capacity", bad)
    assert run("proxy-key", "revoke", "p1")[0] == 0
    assert run("proxy-key", "update", "p1", "--max-capacity", "3")[0] == 1
