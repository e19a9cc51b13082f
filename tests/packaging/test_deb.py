"""The Debian package, end to end: build, inspect, install with apt, run, purge.

Needs root and Debian 12's apt registries (the package's dependencies are Debian's
python3-* packages). Anything missing makes the tests FAIL with the reason, never skip.
The installed daemons run from Debian's /usr/bin/python3, not this suite's interpreter.
Takes about a minute. Every packaging module shares one build and one installation
(``conftest.py``); ``test_purge_leaves_nothing`` runs after all of them and purges it (the
fixture purges too, if a test in between failed).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.packaging.installed import (
    UNIT_DIR,
    http_status,
    installed_daemon,
    sandboxed_command,
    unit_command,
    unit_settings,
)
from tests.packaging.package import REPO, package_state, purge, run

PYLIB = Path("/usr/lib/python3/dist-packages")
PLUGINS = PYLIB / "twisted" / "plugins"
DEBIAN_PYTHON = "/usr/bin/python3"
DEPENDENCIES = [
    "python3-twisted",
    "python3-autobahn",
    "python3-openssl",
    "python3-service-identity",
    "python3-treq",
    "python3-cryptography",
    "python3-prometheus-client",
    "novnc",
]
UNITS = ["cpvm", "cpvm-manager"]
USERS = ["cpvm", "cpvm-manager"]

pytestmark = pytest.mark.packaging


def plugin_cache_modules() -> set[str]:
    """Module names listed in twisted/plugins/dropin.cache, read by Debian's Python."""
    cache = PLUGINS / "dropin.cache"
    if not cache.exists():
        return set()
    result = run(
        [
            DEBIAN_PYTHON,
            "-c",
            "import pickle, sys; print(' '.join(pickle.load(open(sys.argv[1], 'rb'))))",
            str(cache),
        ],
        cwd="/",
    )
    return set(result.stdout.split())


def debian_version(module: str) -> str:
    return run(
        [DEBIAN_PYTHON, "-c", f"import {module}; print({module}.__version__)"], cwd="/"
    ).stdout.strip()


# --- The .deb itself ----------------------------------------------------------------------


def test_build_command_names_the_deb_after_the_version(deb: Path) -> None:
    init = (REPO / "cpvm" / "__init__.py").read_text()
    version = re.search(r'__version__ = "([^"]+)"', init).group(1)
    assert deb == REPO / "dist" / f"cpvm_{version}_all.deb"
    fields = run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]).stdout
    assert fields.split() == ["Package:", "cpvm", "Version:", version, "Architecture:", "all"]


def test_control_depends_on_debians_libraries(deb: Path) -> None:
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout
    names = {d.split()[0].split(":")[0] for d in depends.replace("\n", " ").split(",")}
    assert set(DEPENDENCIES) | {"python3", "adduser"} <= names
    # Bounds from setup.cfg, which are Debian 12's versions.
    for bound in (
        "python3-twisted (>= 22.4)",
        "python3-autobahn (>= 22.7)",
        "python3-treq (>= 22.2)",
        "python3-cryptography (>= 38.0)",
        "python3-prometheus-client (>= 0.16)",
    ):
        assert bound in depends
    assert "python3-psycopg2" in run(["dpkg-deb", "-f", str(deb), "Recommends"]).stdout
    # Debian's noVNC and websockify packages are used, never replaced.
    for field in ("Conflicts", "Breaks", "Replaces", "Provides"):
        assert run(["dpkg-deb", "-f", str(deb), field]).stdout.strip() == ""


def test_control_archive_declares_conffiles_and_scripts(deb: Path) -> None:
    info = run(["dpkg-deb", "-I", str(deb)]).stdout
    for member in ("control", "conffiles", "md5sums", "postinst", "prerm", "postrm"):
        assert re.search(rf"^\s+\d+ bytes,\s+\d+ lines\s+\*?\s+{member}\b", info, re.MULTILINE), (
            member
        )
    conffiles = run(["dpkg-deb", "-I", str(deb), "conffiles"]).stdout.split()
    assert conffiles == ["/etc/cpvm/cpvm.conf", "/etc/cpvm/manager.conf"]


def test_contents(deb: Path) -> None:
    listing = run(["dpkg-deb", "-c", str(deb)]).stdout.splitlines()
    paths = {line.split(None, 5)[5].removeprefix(".") for line in listing}
    owners = {line.split()[1] for line in listing}
    assert owners == {"root/root"}
    expected = {
        "/etc/cpvm/cpvm.conf",
        "/etc/cpvm/manager.conf",
        "/lib/systemd/system/cpvm.service",
        "/lib/systemd/system/cpvm-manager.service",
        f"{PLUGINS}/cpvm_plugin.py",
        "/usr/bin/cpvm-manager-admin",
        "/usr/bin/cpvm-probe",
        "/usr/share/man/man1/cpvm-probe.1.gz",
        "/usr/share/doc/cpvm/copyright",
        "/usr/share/doc/cpvm/changelog.gz",
        "/usr/share/doc/cpvm/operations.md",
    }
    modules = {
        f"{PYLIB}/{p.relative_to(REPO)}"
        for p in (REPO / "cpvm").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert expected <= paths
    assert modules <= {p for p in paths if p.startswith(f"{PYLIB}/cpvm/")}
    junk = [
        p
        for p in paths
        if "__pycache__" in p
        or p.endswith((".pyc", ".pyo"))
        or "dropin.cache" in p
        or ".egg-info" in p
        or p.startswith(f"{PYLIB}/tests")
    ]
    assert junk == []
    # Only our own module in twisted/plugins (the directory belongs to python3-twisted).
    assert {p for p in paths if p.startswith(f"{PLUGINS}/") and not p.endswith("/")} == {
        f"{PLUGINS}/cpvm_plugin.py"
    }
    assert all(not p.startswith(("/usr/local", "/opt", "/home", "/root")) for p in paths)


# --- Installed ----------------------------------------------------------------------------


def test_apt_pulled_every_dependency(installed: Path) -> None:
    for package in DEPENDENCIES + ["cpvm"]:
        status = run(["dpkg-query", "-W", "-f=${db:Status-Status}", package], check=False)
        assert status.stdout == "installed", f"{package}: {status.stdout or status.stderr}"
    # The minimum versions our code needs, as Debian 12 ships them.
    versions = {m: debian_version(m) for m in ("twisted", "autobahn", "treq", "cryptography")}
    assert all(versions.values()), versions
    # This suite's own interpreter still uses its own libraries.
    import twisted

    assert not twisted.__file__.startswith("/usr/lib/python3/"), twisted.__file__


def test_cpvm_imports_under_debians_python(installed: Path) -> None:
    code = (
        "import pkgutil, importlib, cpvm\n"
        "for m in pkgutil.walk_packages(cpvm.__path__, 'cpvm.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(cpvm.__file__)\n"
    )
    out = run([DEBIAN_PYTHON, "-c", code], cwd="/").stdout.strip()
    assert out == f"{PYLIB}/cpvm/__init__.py"


def test_users_directories_and_permissions(installed: Path) -> None:
    for user in USERS:
        entry = pwd.getpwnam(user)
        assert entry.pw_uid < 1000, f"{user} is not a system user"
        assert entry.pw_shell == "/usr/sbin/nologin"
        assert grp.getgrgid(entry.pw_gid).gr_name == user

    def mode_owner(path: str) -> tuple[int, str, str]:
        st = os.stat(path)
        return (
            stat.S_IMODE(st.st_mode),
            pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name,
        )

    assert pwd.getpwnam("cpvm-manager").pw_dir == "/var/lib/cpvm-manager"
    assert mode_owner("/var/lib/cpvm-manager") == (0o750, "cpvm-manager", "cpvm-manager")
    assert mode_owner("/var/log/cpvm") == (0o750, "cpvm", "cpvm")
    assert mode_owner("/var/lib/cpvm") == (0o750, "cpvm", "cpvm")
    assert mode_owner("/etc/cpvm/cpvm.conf") == (0o640, "root", "cpvm")
    assert mode_owner("/etc/cpvm/manager.conf") == (0o640, "root", "cpvm-manager")
    # One TLS directory per daemon (tests/packaging/test_tls_dirs.py upgrades over them).
    assert mode_owner("/etc/cpvm/proxy-tls") == (0o750, "root", "cpvm")
    assert mode_owner("/etc/cpvm/manager-tls") == (0o750, "root", "cpvm-manager")
    # Byte-code compiled by root at installation, for the service users to use.
    assert list((PYLIB / "cpvm" / "proxy" / "__pycache__").glob("tap.cpython-3*.pyc"))


def test_debians_twistd_lists_the_plugins_for_the_service_user(installed: Path) -> None:
    cache = PLUGINS / "dropin.cache"
    assert "cpvm_plugin" in plugin_cache_modules()
    before = cache.stat().st_mtime_ns
    for user in USERS:
        result = run(["runuser", "-u", user, "--", "/usr/bin/twistd3", "--help"], cwd="/")
        assert re.search(r"^\s+cpvm\s", result.stdout, re.MULTILINE), result.stdout
        assert re.search(r"^\s+cpvm-manager\s", result.stdout, re.MULTILINE), result.stdout
        # A stale cache would make twistd try (and, on a read-only /usr, fail) to rewrite it.
        assert "plugin cache" not in (result.stdout + result.stderr).lower()
    assert cache.stat().st_mtime_ns == before
    assert stat.S_IMODE(cache.stat().st_mode) & 0o022 == 0


def test_installed_proxy_answers_healthz(installed: Path) -> None:
    config = textwrap.dedent("""\
        [server]
        bind = 127.0.0.1
        port = 0
        public_host = 127.0.0.1
        [manager]
        # Nothing listens there: /healthz must not depend on the manager.
        url = http://127.0.0.1:9
        """)
    with installed_daemon("cpvm", config) as port:
        assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
        assert http_status(f"http://127.0.0.1:{port}/readyz") == 503
        assert http_status(f"http://127.0.0.1:{port}/metrics") == 200


def test_installed_manager_answers_healthz(installed: Path) -> None:
    # Default data_dir: the package's /var/lib/cpvm-manager, as in production.
    config = "[server]\nlisten = tcp:0:interface=127.0.0.1\n"
    with installed_daemon("cpvm-manager", config) as port:
        assert http_status(f"http://127.0.0.1:{port}/healthz") == 200
        assert http_status(f"http://127.0.0.1:{port}/readyz") == 200
    key = Path("/var/lib/cpvm-manager/secret.key")
    st = key.stat()
    assert pwd.getpwuid(st.st_uid).pw_name == "cpvm-manager"
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_installed_daemon_sandbox_is_enforced(installed: Path) -> None:
    """installed_daemon's approximation of the units' sandbox really restricts."""
    probe = textwrap.dedent("""\
        touch /usr/lib/cpvm-probe 2>/dev/null && echo usr-writable
        touch /etc/cpvm-probe 2>/dev/null && echo etc-writable
        touch /var/log/cpvm/probe && rm /var/log/cpvm/probe && echo logs-writable
        [ -e /proc/stat ] && echo proc-stat-visible
        [ -e /proc/1 ] && echo pid1-visible
        grep -q NoNewPrivs:.*1 /proc/self/status && echo no-new-privs
        """)
    settings = unit_settings(UNIT_DIR / "cpvm.service")
    argv = sandboxed_command(["runuser", "-u", "cpvm", "--", "sh", "-c", probe], settings)
    assert run(argv, cwd="/").stdout.split() == ["logs-writable", "no-new-privs"]


def test_admin_tool_run_as_root_acts_as_the_manager_user(installed: Path) -> None:
    result = run(["/usr/bin/cpvm-manager-admin", "account", "list"], cwd="/")
    assert result.returncode == 0
    for path in Path("/var/lib/cpvm-manager").iterdir():
        assert pwd.getpwuid(path.stat().st_uid).pw_name == "cpvm-manager", path


def test_units_pass_systemd_analyze_verify(installed: Path) -> None:
    for unit in UNITS:
        assert (UNIT_DIR / f"{unit}.service").read_text() == (
            REPO / "systemd" / f"{unit}.service"
        ).read_text()
    result = run(
        ["systemd-analyze", "verify", *(str(UNIT_DIR / f"{u}.service") for u in UNITS)], check=False
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_units_run_twistd_in_the_foreground_hardened() -> None:
    for unit in UNITS:
        s = unit_settings(REPO / "systemd" / f"{unit}.service")
        argv = unit_command(unit, "/x.conf", REPO / "systemd")
        assert argv[:5] == [
            "/usr/bin/twistd3",
            "--nodaemon",
            "--pidfile=",
            "--reactor=cpvm",
            "--logger=cpvm.common.logs.observer",
        ]
        assert argv[5:] == [unit, "--config", "/x.conf"]
        assert s["User"] == [unit]
        config = "/etc/cpvm/cpvm.conf" if unit == "cpvm" else "/etc/cpvm/manager.conf"
        assert s["ExecStart"][0].endswith(f"--config {config}")
        for key, value in {
            "Restart": "on-failure",
            "KillSignal": "SIGTERM",
            "UMask": "0077",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "ProtectHome": "yes",
            "PrivateTmp": "yes",
            "PrivateDevices": "yes",
            "DevicePolicy": "closed",
            "CapabilityBoundingSet": "",
            "AmbientCapabilities": "",
            "PrivateUsers": "yes",
            "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "SystemCallArchitectures": "native",
            "ProtectKernelTunables": "yes",
            "ProtectKernelModules": "yes",
            "ProtectKernelLogs": "yes",
            "ProtectControlGroups": "yes",
            "ProtectClock": "yes",
            "ProtectHostname": "yes",
            "RestrictNamespaces": "yes",
            "RestrictRealtime": "yes",
            "RestrictSUIDSGID": "yes",
            "LockPersonality": "yes",
            "MemoryDenyWriteExecute": "no",
            "ProtectProc": "invisible",
            "ProcSubset": "pid",
            "PrivateMounts": "yes",
        }.items():
            assert s.get(key) == [value], (unit, key, s.get(key))
        assert "@system-service" in s["SystemCallFilter"]
        assert int(s["LimitNOFILE"][0]) >= 65536
        # Above cpvm's default [server] grace_period (10 s) with room for the manager.
        assert float(s["TimeoutStopSec"][0]) > 10 + 5
        assert "IPAddressDeny" not in s
    # Signals go to the first process, which passes them on to its workers.
    cpvm = unit_settings(REPO / "systemd" / "cpvm.service")
    assert cpvm["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert cpvm["KillMode"] == ["mixed"]
    assert unit_settings(REPO / "systemd" / "cpvm-manager.service")["StateDirectory"] == [
        "cpvm-manager"
    ]
    # The default [server] state_directory: the instance id survives restarts.
    assert cpvm["StateDirectory"] == ["cpvm"]


def test_units_security_exposure_stays_low() -> None:
    """``systemd-analyze security`` (offline: no running systemd needed); README has 1.1."""
    for unit in UNITS:
        result = run(
            [
                "systemd-analyze",
                "security",
                "--offline=true",
                "--no-pager",
                str(REPO / "systemd" / f"{unit}.service"),
            ],
            check=False,
        )
        match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
        assert match, result.stdout + result.stderr
        assert float(match.group(1)) <= 1.5, (unit, match.group(1))


def test_memory_deny_write_execute_breaks_tls(installed: Path) -> None:
    """Why the units say MemoryDenyWriteExecute=no: W^X breaks every pyOpenSSL context.

    The kernel's PR_SET_MDWE (Linux 6.3+) enforces what systemd's MemoryDenyWriteExecute=
    does with seccomp. Under it, Debian 12's cffi cannot allocate the closure for the
    verify callback Twisted sets on every TLS context. If this test starts failing because
    the context is created fine, W^X became possible: turn MemoryDenyWriteExecute=yes on.
    """
    code = textwrap.dedent("""\
        import ctypes, sys
        if sys.argv[1] == "mdwe":
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
                print("no-prctl", ctypes.get_errno()); sys.exit()
        from twisted.internet import ssl
        try:
            ssl.CertificateOptions().getContext()
        except MemoryError as e:
            print("MemoryError", e)
        else:
            print("ok")
        """)
    plain = run([DEBIAN_PYTHON, "-c", code, "plain"], cwd="/").stdout
    mdwe = run([DEBIAN_PYTHON, "-c", code, "mdwe"], cwd="/").stdout
    assert plain.strip() == "ok"
    if mdwe.startswith("no-prctl"):
        pytest.fail(f"this kernel has no PR_SET_MDWE (Linux >= 6.3 needed): {mdwe}", pytrace=False)
    assert mdwe.startswith("MemoryError"), mdwe


# --- Purge (last) ---------------------------------------------------------------------------


@pytest.mark.purges_package
def test_purge_leaves_nothing(installed: Path) -> None:
    uids = {str(pwd.getpwnam(user).pw_uid) for user in USERS}
    # A certbot-style link in /etc/cpvm: the purge removes the link, never its target.
    target_dir = Path(tempfile.mkdtemp(prefix="cpvm-test-letsencrypt-", dir="/etc"))
    target = target_dir / "privkey1.pem"
    target.write_text("not a real key\n")
    target.chmod(0o600)
    Path("/etc/cpvm/manager-tls/key.pem").symlink_to(target)
    try:
        purge()
        assert target.read_text() == "not a real key\n"
        assert (stat.S_IMODE(target.stat().st_mode), target.stat().st_uid) == (0o600, 0)
    finally:
        shutil.rmtree(target_dir)
    assert package_state() == "not-installed"
    leftovers = [
        p
        for p in (
            "/etc/cpvm",
            "/var/lib/cpvm-manager",
            "/var/lib/cpvm",
            "/var/log/cpvm",
            "/lib/systemd/system/cpvm.service",
            "/lib/systemd/system/cpvm-manager.service",
            "/usr/bin/cpvm-manager-admin",
            f"{PYLIB}/cpvm",
            f"{PLUGINS}/cpvm_plugin.py",
            "/usr/share/doc/cpvm",
            "/usr/share/man/man1/cpvm-manager-admin.1.gz",
            "/usr/bin/cpvm-probe",
            "/usr/share/man/man1/cpvm-probe.1.gz",
        )
        if os.path.lexists(p)
    ]
    leftovers += [str(p) for p in PYLIB.glob("cpvm-*.dist-info")]
    leftovers += [str(p) for p in (PLUGINS / "__pycache__").glob("cpvm_plugin*")]
    leftovers += [str(p) for p in Path("/etc/systemd/system").rglob("cpvm*")]
    leftovers += [str(p) for p in Path("/var/lib/systemd").rglob("*cpvm*")]
    assert leftovers == []
    # No daemon (or worker) the tests started outlived them.
    running = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and _real_uid(p) in uids]
    assert running == []
    for user in USERS:
        assert run(["getent", "passwd", user], check=False).returncode == 2, user
        assert run(["getent", "group", user], check=False).returncode == 2, user
    assert "cpvm_plugin" not in plugin_cache_modules()
    # Debian's libraries stay (apt autoremove's business) and still load their plugins.
    assert "twisted_web" in plugin_cache_modules()


def _real_uid(proc_dir: Path) -> str | None:
    try:
        for line in (proc_dir / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                return line.split()[1]
    except OSError:
        pass
    return None
