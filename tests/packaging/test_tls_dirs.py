"""Each daemon's TLS key survives package upgrades, readable by that daemon only.

The 0.1.0 postinst forced ``/etc/cpvm/tls`` to root:cpvm 0750 and every file in it to
root:cpvm 0640 at each configure, following symlinks: the manager's key (which the docs
put there) became readable by the internet-facing ``cpvm`` user and unreadable by the
manager, and a certbot-style link's target was chowned. Now the package creates
``/etc/cpvm/proxy-tls`` (root:cpvm 0750) and ``/etc/cpvm/manager-tls`` (root:cpvm-manager
0750) when they are missing and never touches them, their files or an existing
``/etc/cpvm/tls`` again.

Each test places the keys the way ``docs/operations.md`` says (one of them a symlink into
a certbot-like tree elsewhere), upgrades (``dpkg -i`` of the same .deb: prerm upgrade,
unpack, postinst configure) and then starts both installed daemons over TLS as their units
run them, checks that neither daemon's user can read the other's key and that nothing the
operator placed changed owner or mode.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import ssl
import stat
import tempfile
import textwrap
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import peers
from tests.packaging.installed import UNIT_DIR, installed_daemon, sandboxed_command, unit_settings
from tests.packaging.package import reinstall, run

pytestmark = pytest.mark.packaging

PROXY_TLS = Path("/etc/cpvm/proxy-tls")
MANAGER_TLS = Path("/etc/cpvm/manager-tls")
LEGACY_TLS = Path("/etc/cpvm/tls")


@dataclass
class Placed:
    """What a test placed: the CA of each daemon's certificate and every path to watch."""

    proxy_ca: bytes
    manager_ca: bytes
    proxy_key: Path
    manager_key: Path
    link_target: Path
    watched: list[Path]


def place(path: Path, data: bytes, group: str, mode: int = 0o640) -> None:
    """``install -m MODE -o root -g GROUP /dev/stdin PATH``, the docs' way."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def metadata(path: Path) -> tuple[str, str, int, int]:
    """(type, mode, uid, gid) of ``path`` itself (a link is not followed)."""
    st = os.lstat(path)
    kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
    return kind, f"{stat.S_IMODE(st.st_mode):04o}", st.st_uid, st.st_gid


@contextlib.contextmanager
def certbot_tree(key: bytes, group: str) -> Iterator[Path]:
    """A certbot-like ``live/<name>/privkey.pem`` link to ``archive/<name>/privkey1.pem``,
    outside /etc/cpvm, readable by ``group``'s daemon; yields the ``live`` link."""
    # Under /etc like /etc/letsencrypt: readable in the units' sandbox (not in /tmp, which
    # their PrivateTmp= would hide).
    top = Path(tempfile.mkdtemp(prefix="cpvm-test-letsencrypt-", dir="/etc"))
    try:
        os.chmod(top, 0o755)
        (top / "archive" / "manager").mkdir(parents=True, mode=0o755)
        (top / "live" / "manager").mkdir(parents=True, mode=0o755)
        place(top / "archive" / "manager" / "privkey1.pem", key, group)
        live = top / "live" / "manager" / "privkey.pem"
        live.symlink_to("../../archive/manager/privkey1.pem")
        yield live
    finally:
        shutil.rmtree(top, ignore_errors=True)


def cpvm_conf(*tls_lines: str) -> str:
    return "\n".join(
        [
            "[server]",
            "bind = 127.0.0.1",
            "port = 0",
            "public_host = 127.0.0.1",
            "tls = true",
            *tls_lines,
            # Nothing listens there: /healthz must not depend on the manager.
            "[manager]",
            "url = http://127.0.0.1:9",
            "",
        ]
    )


def manager_conf(key: Path, cert: Path) -> str:
    return f"[server]\nlisten = ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}\n"


def https_healthz(port: int, ca_pem: bytes) -> int:
    """GET /healthz over TLS, verifying the daemon's certificate against ``ca_pem``."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    url = f"https://127.0.0.1:{port}/healthz"
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.status


def both_serve_tls(placed: Placed, cpvm_config: str, manager_config: str) -> None:
    """Both installed daemons start as their units run them and serve their own
    certificate (each verified against its own CA)."""
    with installed_daemon("cpvm", cpvm_config) as port:
        assert https_healthz(port, placed.proxy_ca) == 200
    with installed_daemon("cpvm-manager", manager_config) as port:
        assert https_healthz(port, placed.manager_ca) == 200


def can_read(user: str, path: Path) -> bool:
    """Whether ``user`` can read ``path`` (``runuser -u USER -- cat PATH``)."""
    return (
        run(["runuser", "-u", user, "--", "cat", str(path)], check=False, cwd="/").returncode == 0
    )


def assert_each_key_readable_by_its_daemon_only(placed: Placed) -> None:
    assert can_read("cpvm", placed.proxy_key)
    assert can_read("cpvm-manager", placed.manager_key)
    assert not can_read("cpvm-manager", placed.proxy_key), "the manager reads the proxy's key"
    assert not can_read("cpvm", placed.manager_key), "cpvm reads the manager's key"
    assert not can_read("cpvm", placed.link_target), "cpvm reads the manager's key"


@pytest.fixture
def pki(tmp_path: Path) -> tuple[peers.TestPki, peers.TestPki]:
    """Two unrelated CAs, with a server certificate for 127.0.0.1 each: (proxy, manager)."""
    return peers.make_test_ca(tmp_path / "proxy"), peers.make_test_ca(tmp_path / "manager")


@pytest.fixture
def new_layout(installed: Path, pki) -> Iterator[Placed]:
    """Keys placed as docs/operations.md says: the proxy's in /etc/cpvm/proxy-tls, the
    manager's in /etc/cpvm/manager-tls, its key a link into a certbot-like tree."""
    proxy, manager = pki
    with certbot_tree(manager.server_key.read_bytes(), "cpvm-manager") as live:
        place(PROXY_TLS / "cert.pem", proxy.server_cert.read_bytes(), "cpvm")
        place(PROXY_TLS / "key.pem", proxy.server_key.read_bytes(), "cpvm")
        place(MANAGER_TLS / "cert.pem", manager.server_cert.read_bytes(), "cpvm-manager")
        (MANAGER_TLS / "key.pem").symlink_to(live)
        names = ["cert.pem", "key.pem"]
        watched = [
            PROXY_TLS,
            MANAGER_TLS,
            *(PROXY_TLS / n for n in names),
            *(MANAGER_TLS / n for n in names),
            live,
            live.resolve(),
        ]
        try:
            yield Placed(
                proxy.ca_cert.read_bytes(),
                manager.ca_cert.read_bytes(),
                PROXY_TLS / "key.pem",
                MANAGER_TLS / "key.pem",
                live.resolve(),
                watched,
            )
        finally:
            for name in names:
                (PROXY_TLS / name).unlink(missing_ok=True)
                (MANAGER_TLS / name).unlink(missing_ok=True)


@pytest.fixture
def linked_proxy_key(installed: Path) -> Iterator[list[Path]]:
    """``/etc/cpvm/proxy.key`` as a link to a file elsewhere that its operator made cpvm's
    own, 0400 (0.1.0's postinst made it root:cpvm 0640 through the link); yields both.
    An existing proxy.key is set aside and put back."""
    key = Path("/etc/cpvm/proxy.key")
    saved = key.with_name("proxy.key.test-saved")
    if os.path.lexists(key):
        key.rename(saved)
    top = Path(tempfile.mkdtemp(prefix="cpvm-test-secrets-", dir="/etc"))
    try:
        os.chmod(top, 0o755)
        target = top / "proxy.key"
        target.write_text("cpvmk_00000000.not-a-real-key\n")
        cpvm = pwd.getpwnam("cpvm")
        os.chown(target, cpvm.pw_uid, cpvm.pw_gid)
        os.chmod(target, 0o400)
        key.symlink_to(target)
        yield [key, target]
    finally:
        key.unlink(missing_ok=True)
        if os.path.lexists(saved):
            saved.rename(key)
        shutil.rmtree(top, ignore_errors=True)


def test_installation_gives_each_daemon_its_tls_directory(installed: Path) -> None:
    cpvm_gid = grp.getgrnam("cpvm").gr_gid
    manager_gid = grp.getgrnam("cpvm-manager").gr_gid
    assert metadata(PROXY_TLS) == ("dir", "0750", 0, cpvm_gid)
    assert metadata(MANAGER_TLS) == ("dir", "0750", 0, manager_gid)
    assert not os.path.lexists(LEGACY_TLS)


def test_each_daemon_keeps_its_tls_through_an_upgrade(
    installed: Path, new_layout: Placed, linked_proxy_key: list[Path]
) -> None:
    placed = new_layout
    placed.watched += linked_proxy_key
    cpvm_config = cpvm_conf(
        f"certificate = {PROXY_TLS}/cert.pem", f"private_key = {PROXY_TLS}/key.pem"
    )
    manager_config = manager_conf(MANAGER_TLS / "key.pem", MANAGER_TLS / "cert.pem")
    both_serve_tls(placed, cpvm_config, manager_config)
    before = {p: metadata(p) for p in placed.watched}

    reinstall(installed)

    assert {p: metadata(p) for p in placed.watched} == before
    assert_each_key_readable_by_its_daemon_only(placed)
    both_serve_tls(placed, cpvm_config, manager_config)
    # cpvm's default certificate and private_key are the pair in its directory.
    with installed_daemon("cpvm", cpvm_conf()) as port:
        assert https_healthz(port, placed.proxy_ca) == 200


@pytest.fixture
def legacy_layout(installed: Path, pki) -> Iterator[Placed]:
    """A 0.1.0 host: no per-daemon directories yet, both daemons' files in /etc/cpvm/tls
    as its operator fixed them after the old postinst (the directory 0751 so the manager
    can pass, the manager's certificate 0644, its key a link to a certbot-like tree)."""
    proxy, manager = pki
    for path in (PROXY_TLS, MANAGER_TLS, LEGACY_TLS):  # empty ones only: rmdir
        if path.exists():
            path.rmdir()
    LEGACY_TLS.mkdir()
    os.chown(LEGACY_TLS, 0, grp.getgrnam("cpvm").gr_gid)
    os.chmod(LEGACY_TLS, 0o751)
    try:
        with certbot_tree(manager.server_key.read_bytes(), "cpvm-manager") as live:
            place(LEGACY_TLS / "cert.pem", proxy.server_cert.read_bytes(), "cpvm")
            place(LEGACY_TLS / "key.pem", proxy.server_key.read_bytes(), "cpvm")
            place(
                LEGACY_TLS / "manager.crt", manager.server_cert.read_bytes(), "cpvm-manager", 0o644
            )
            (LEGACY_TLS / "manager.key").symlink_to(live)
            watched = [LEGACY_TLS, *LEGACY_TLS.iterdir(), live, live.resolve()]
            yield Placed(
                proxy.ca_cert.read_bytes(),
                manager.ca_cert.read_bytes(),
                LEGACY_TLS / "key.pem",
                LEGACY_TLS / "manager.key",
                live.resolve(),
                watched,
            )
    finally:
        shutil.rmtree(LEGACY_TLS, ignore_errors=True)
        # What the package makes, should the upgrade under test not have made it.
        for path, group in ((PROXY_TLS, "cpvm"), (MANAGER_TLS, "cpvm-manager")):
            if not path.exists():
                path.mkdir(mode=0o750)
                os.chown(path, 0, grp.getgrnam(group).gr_gid)
                os.chmod(path, 0o750)


def test_upgrade_leaves_the_old_tls_directory_as_the_operator_set_it(
    installed: Path, legacy_layout: Placed, linked_proxy_key: list[Path]
) -> None:
    placed = legacy_layout
    placed.watched += linked_proxy_key
    before = {p: metadata(p) for p in placed.watched}

    result = reinstall(installed)

    assert {p: metadata(p) for p in placed.watched} == before
    assert "/etc/cpvm/tls is no longer managed by the package" in result.stderr
    assert_each_key_readable_by_its_daemon_only(placed)
    # cpvm relying on the default paths and the manager configured as 0.1.0's docs said
    # both still serve TLS.
    manager_config = manager_conf(LEGACY_TLS / "manager.key", LEGACY_TLS / "manager.crt")
    both_serve_tls(placed, cpvm_conf(), manager_config)
    # The new directories are there for the operator to move to.
    assert metadata(PROXY_TLS) == ("dir", "0750", 0, grp.getgrnam("cpvm").gr_gid)
    assert metadata(MANAGER_TLS) == ("dir", "0750", 0, grp.getgrnam("cpvm-manager").gr_gid)


def test_units_hide_the_other_daemons_secrets(installed: Path, new_layout: Placed) -> None:
    """Beyond the modes: each unit's InaccessiblePaths= covers the other daemon's secrets
    (the probe runs as root in the unit's sandbox, so no file mode stops it; outside the
    sandbox the same probe sees them)."""
    probe = textwrap.dedent("""\
        for path in "$@"; do
            if [ -d "$path" ]; then ls -A "$path"; else cat "$path"; fi 2>/dev/null
            echo "end of $path"
        done
        """)
    hidden = {
        "cpvm": [MANAGER_TLS, Path("/var/lib/cpvm-manager")],
        "cpvm-manager": [PROXY_TLS, Path("/etc/cpvm/proxy.key")],
    }
    with contextlib.ExitStack() as cleanup:
        # Something to hide in each path (test_installed_console may have left a proxy key).
        for path in (Path("/etc/cpvm/proxy.key"), Path("/var/lib/cpvm-manager/probe")):
            if not path.exists():
                path.write_text("probe\n")
                cleanup.callback(path.unlink)
        for unit, paths in hidden.items():
            argv = ["sh", "-c", probe, "probe", *map(str, paths)]
            unhidden = run(argv, cwd="/").stdout.split()
            assert len(unhidden) > 3 * len(paths), (unit, "nothing to hide", unhidden)
            settings = unit_settings(UNIT_DIR / f"{unit}.service")
            seen = run(sandboxed_command(argv, settings), cwd="/", check=False).stdout.split()
            assert seen == [w for p in paths for w in ("end", "of", str(p))], (unit, seen)
