"""A console session through the installed package, to a real VNC server.

With the .deb installed (the shared ``installed`` fixture, ``conftest.py``), the installed
manager runs as ``cpvm-manager`` from its unit's ExecStart, is bootstrapped with the
installed ``/usr/bin/cpvm-manager-admin`` (account, API key, proxy key in
``/etc/cpvm/proxy.key``, a VM whose console is a real QEMU), and the installed cpvm runs as
``cpvm``, all on Debian's ``/usr/bin/python3`` and libraries. A signed createConsoleEndpoint
call (the client side, from this checkout) gives a WebSocket URL; its token works once.
Then the same with ``[server] workers = 2`` over TLS, as the unit runs it (every process
under the unit's limits, both reloaded by its ExecReload, both stopped by its KillSignal).
Last, none of the daemons' logs holds a secret. ``test_purge_leaves_nothing`` (in
``test_deb.py``) runs after this module and checks that the purge removes what it left:
``/etc/cpvm/proxy.key``, ``/etc/cpvm/proxy-tls/``, the database, ``/var/log/cpvm/audit.log``.

If the installed code breaks on Debian's libraries, the failure carries the daemons' log
tails and their tracebacks (file:line) rather than a bare timeout.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import resource
import shlex
import socket
import ssl
import struct
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests import peers
from tests.packaging.installed import (
    UNIT_DIR,
    as_user,
    config_file,
    http_status,
    installed_daemon,
    pids_listening_on,
    sandboxed_command,
    unit_settings,
)
from tests.packaging.package import run
from tests.signing import DEFAULT_TTL, signed_query
from tests.wsclient import RfbRefused, RfbWebSocketClient, open_console

pytestmark = pytest.mark.packaging

ADMIN = "/usr/bin/cpvm-manager-admin"
DATA_DIR = "/var/lib/cpvm-manager"  # the unit's StateDirectory: writable in its sandbox
PROXY_KEY = Path("/etc/cpvm/proxy.key")
TLS_DIR = Path("/etc/cpvm/proxy-tls")
AUDIT_FILE = Path("/var/log/cpvm/audit.log")
VM_NAME = "installed-console-vm"
ACCOUNT = "installed-console"
READY_TIMEOUT = 30.0

MANAGER_CONF = textwrap.dedent(f"""\
    [server]
    listen = tcp:0:interface=127.0.0.1
    data_dir = {DATA_DIR}
    [proxies]
    heartbeat_interval = 1
    """)


@dataclass
class ConsoleStack:
    """The installed manager and a QEMU, bootstrapped; what the tests need to use them."""

    manager_port: int
    qemu: peers.QemuVnc
    vm_id: str
    api_key: str
    secret_key: str
    proxy_key: str
    logs: dict[str, list[str]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    signatures: list[str] = field(default_factory=list)
    resources: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def new_log(self, name: str) -> list[str]:
        lines: list[str] = []
        self.logs[name] = lines
        return lines

    def cpvm_conf(self, port: int, *extra: str) -> str:
        """An installed cpvm's configuration against this manager, at debug level
        (``extra``: more ``[server]`` lines)."""
        return "\n".join(
            [
                "[server]",
                "bind = 127.0.0.1",
                f"port = {port}",
                "public_host = 127.0.0.1",
                *extra,
                "[manager]",
                f"url = http://127.0.0.1:{self.manager_port}",
                f"credential_file = {PROXY_KEY}",
                "heartbeat_interval = 1",
                "[log]",
                "level = debug",
                f"audit_file = {AUDIT_FILE}",
                "",
            ]
        )

    def create_console_endpoint(self) -> dict:
        """A signed createConsoleEndpoint call, as any CloudStack API client makes it."""
        params = signed_query(
            {
                "command": "createConsoleEndpoint",
                "virtualmachineid": self.vm_id,
                "response": "json",
            },
            self.api_key,
            self.secret_key,
            expires_at=time.time() + DEFAULT_TTL,
        )
        self.signatures.append(params["signature"])
        url = f"http://127.0.0.1:{self.manager_port}/client/api?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)["createconsoleendpointresponse"]["consoleendpoint"]
        assert answer.get("success") is True, answer
        self.tokens.append(answer["websocket"]["token"])
        return answer

    def secrets(self) -> dict[str, str]:
        found = {
            "VNC password": peers.QEMU_TEST_PASSWORD,
            "API secret key": self.secret_key,
            "proxy key": self.proxy_key,
            "proxy key's secret part": self.proxy_key.split(".", 1)[1],
        }
        found.update({f"token {n}": t for n, t in enumerate(self.tokens)})
        found.update({f"signature {n}": s for n, s in enumerate(self.signatures)})
        return found

    def evidence(self) -> str:
        """The daemons' tracebacks and log tails, for a failure message."""
        parts = []
        for name, lines in self.logs.items():
            text = "".join(lines)
            tracebacks = re.findall(
                r"Traceback \(most recent call last\):.*?^\S[^\n]*$", text, re.MULTILINE | re.DOTALL
            )
            parts.append(
                f"--- {name}: {len(tracebacks)} traceback(s) ---\n"
                + "\n".join(tracebacks[:3])
                + f"\n--- {name}: last lines ---\n"
                + "".join(lines[-40:])
            )
        return "\n".join(parts)


def admin(*args: str, config: Path, stdin: str | None = None) -> str:
    """The installed cpvm-manager-admin, run as root (it becomes cpvm-manager itself)."""
    return run([ADMIN, "--config", str(config), *args], input=stdin, cwd="/").stdout


def write_root_file(path: Path, data: bytes, group: str, mode: int = 0o640) -> None:
    """What ``install -m 0640 -o root -g <group> /dev/stdin <path>`` does (the docs' way)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)


def wait_ready(url: str, stack: ConsoleStack, what: str) -> None:
    """Poll ``url`` (bounded) until it answers 200: for cpvm's /readyz, it has heartbeated."""
    deadline = time.monotonic() + READY_TIMEOUT
    status: object = None
    while time.monotonic() < deadline:
        try:
            status = http_status(url)
        except OSError as e:
            status = repr(e)
        if status == 200:
            return
        time.sleep(0.1)
    pytest.fail(
        f"{what}: {url} answered {status}, not 200, for {READY_TIMEOUT} s\n{stack.evidence()}",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def console_stack(installed: Path) -> Iterator[ConsoleStack]:
    """QEMU, and the installed manager bootstrapped with the installed admin tool."""
    with contextlib.ExitStack() as stack:
        try:
            qemu = stack.enter_context(peers.start_qemu(peers.QEMU_TEST_PASSWORD))
        except peers.PeerUnavailable as e:
            pytest.fail(f"test peer unavailable: {e}", pytrace=False)
        manager_log: list[str] = []
        conf = stack.enter_context(config_file("cpvm-manager", MANAGER_CONF))
        admin("account", "create", ACCOUNT, config=conf)
        keys = json.loads(admin("--json", "key", "create", ACCOUNT, config=conf))
        proxy_key = admin("proxy-key", "create", "--name", "installed-cpvm", config=conf).strip()
        assert re.fullmatch(r"cpvmk_[0-9a-f]{8}\.\S+", proxy_key), "unexpected proxy key form"
        write_root_file(PROXY_KEY, proxy_key.encode() + b"\n", "cpvm")
        vm_id = admin(
            "vm",
            "add",
            "--name",
            VM_NAME,
            "--owner",
            ACCOUNT,
            "--vnc-host",
            qemu.host,
            "--vnc-port",
            str(qemu.port),
            "--vnc-password-stdin",
            "--state",
            "Running",
            config=conf,
            stdin=peers.QEMU_TEST_PASSWORD + "\n",
        ).strip()
        manager_port = stack.enter_context(
            installed_daemon("cpvm-manager", MANAGER_CONF, output=manager_log)
        )
        result = ConsoleStack(
            manager_port=manager_port,
            qemu=qemu,
            vm_id=vm_id,
            api_key=keys["apikey"],
            secret_key=keys["secretkey"],
            proxy_key=proxy_key,
            logs={"cpvm-manager": manager_log},
            resources=stack,
        )
        wait_ready(f"http://127.0.0.1:{manager_port}/readyz", result, "cpvm-manager")
        yield result


def console_url(answer: dict, scheme: str = "ws") -> str:
    ws = answer["websocket"]
    return f"{scheme}://{ws['host']}:{ws['port']}/{ws['path']}?" + urllib.parse.urlencode(
        {"token": ws["token"]}
    )


async def use_console(
    url: str, origin: str, stack: ConsoleStack, ca_pem: bytes | None = None
) -> RfbWebSocketClient:
    """Open the console, do the RFB handshake, get one framebuffer update; return it open."""
    try:
        client = await open_console(url, origin=origin, ca_pem=ca_pem)
        info = await client.rfb_handshake()
        assert info["name"] == VM_NAME.encode(), info["name"]
        client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, info["width"], info["height"]))
        head = await client.read(4)
        assert head[0] == 0, f"message type {head[0]}, not FramebufferUpdate"
        (rects,) = struct.unpack("!H", head[2:4])
        assert rects >= 1
        return client
    except Exception as e:
        pytest.fail(
            f"console session through the installed cpvm failed: {e!r}\n{stack.evidence()}",
            pytrace=False,
        )


@pytest_twisted.ensureDeferred
async def test_console_session_through_the_installed_daemons(console_stack):
    stack = console_stack
    port = peers.free_port()  # fixed: cpvm announces it to the manager in its heartbeat
    with installed_daemon("cpvm", stack.cpvm_conf(port), output=stack.new_log("cpvm")):
        wait_ready(f"http://127.0.0.1:{port}/readyz", stack, "cpvm")
        answer = stack.create_console_endpoint()
        assert answer["websocket"]["port"] == str(port)
        url = console_url(answer)
        client = await use_console(url, f"http://127.0.0.1:{port}", stack)
        again = await open_console(url, origin=f"http://127.0.0.1:{port}")
        with pytest.raises(RfbRefused, match="token already used"):
            await again.rfb_handshake()
        assert (await again.wait_closed()).code == 4003
        client.sendClose(1000)
        await client.wait_closed()
    # cpvm's audit file has the session, from start to end.
    audit = [json.loads(line) for line in AUDIT_FILE.read_text().splitlines()]
    assert [e.get("event") for e in audit][-2:] == ["acquired", "ended"], audit


# --- Two workers, TLS, as the unit runs them ------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _nofile(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-files limit for {pid}")


def _holder_of_connection(server_port: int, client_port: int, pids: set[int]) -> int | None:
    """Which of ``pids`` holds the accepted end of the connection from ``client_port``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rsplit(":", 1)[1], 16) == server_port
                and int(remote.rsplit(":", 1)[1], 16) == client_port
            ):
                inodes.add(f"socket:[{fields[9]}]")
    for pid in pids:
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
    return None


def _readyz_on_one_connection(
    port: int, context: ssl.SSLContext, pids: set[int]
) -> tuple[int | None, int]:
    """GET /readyz over one new TLS connection: (the process that accepted it, status)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        holder = None
        deadline = time.monotonic() + 2
        while holder is None and time.monotonic() < deadline:
            holder = _holder_of_connection(port, raw.getsockname()[1], pids)
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = tls.recv(64).decode("latin-1")
    return holder, int(head.split()[1])


def _exec_reload(unit: str, main_pid: int) -> None:
    """The unit's ExecReload= lines, as systemd runs them: its user, its sandbox, $MAINPID."""
    settings = unit_settings(UNIT_DIR / f"{unit}.service")
    user = pwd.getpwnam(settings["User"][0])
    for line in settings["ExecReload"]:
        # systemd's expansion: ${MAINPID} anywhere, $MAINPID as a word of its own; the
        # variable is in the environment as well.
        argv = [
            str(main_pid) if a == "$MAINPID" else a.replace("${MAINPID}", str(main_pid))
            for a in shlex.split(line)
        ]
        run(
            sandboxed_command([*as_user(user), *argv], settings),
            cwd="/",
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "MAINPID": str(main_pid)},
        )


@pytest.fixture
def proxy_tls(tmp_path: Path) -> Iterator[bytes]:
    """A test CA's server certificate in /etc/cpvm/proxy-tls (root:cpvm 0640); yields the CA."""
    pki = peers.make_test_ca(tmp_path / "pki")
    write_root_file(TLS_DIR / "cert.pem", pki.server_cert.read_bytes(), "cpvm")
    write_root_file(TLS_DIR / "key.pem", pki.server_key.read_bytes(), "cpvm")
    yield pki.ca_cert.read_bytes()
    for name in ("cert.pem", "key.pem"):
        (TLS_DIR / name).unlink(missing_ok=True)


@pytest_twisted.ensureDeferred
async def test_two_workers_under_the_unit(console_stack, proxy_tls):
    """workers = 2: every process runs under the unit's settings, serves, heartbeats (its
    /readyz is 200), carries sessions, reloads on ExecReload and stops on SIGTERM."""
    stack = console_stack
    ca_pem = proxy_tls
    settings = unit_settings(UNIT_DIR / "cpvm.service")
    port = peers.free_port()
    conf = stack.cpvm_conf(port, "workers = 2", "tls = true", "grace_period = 3")
    log = stack.new_log("cpvm (workers = 2)")
    context = ssl.create_default_context(cadata=ca_pem.decode())
    daemon = installed_daemon("cpvm", conf, output=log)
    await threads.deferToThread(daemon.__enter__)
    clients: list[RfbWebSocketClient] = []
    try:
        # Both processes listen; the second is the first's child, started as "--worker 1".
        deadline = time.monotonic() + READY_TIMEOUT
        while len(pids := pids_listening_on(port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2, f"listening on {port}: {pids}\n{stack.evidence()}"
        (main,) = [p for p in pids if int(_proc_status(p)["PPid"]) not in pids]
        (worker,) = pids - {main}
        assert int(_proc_status(worker)["PPid"]) == main
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
        assert cmdline[-3:-1] == [b"--worker", b"1"], cmdline
        # The unit's settings hold for the worker as for the first process.
        # The unit's LimitNOFILE=, as far as installed_daemon could grant it here.
        nofile = str(
            min(int(settings["LimitNOFILE"][0]), resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
        cpvm_uid = str(pwd.getpwnam("cpvm").pw_uid)
        for pid in (main, worker):
            status = _proc_status(pid)
            assert status["Uid"].split()[0] == cpvm_uid, (pid, status["Uid"])
            assert status["NoNewPrivs"] == "1", pid
            assert _nofile(pid) == (nofile, nofile), (pid, _nofile(pid))
            assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3"), pid
            assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{main}/ns/mnt")

        # Each process answers /readyz 200 (so each heartbeated the manager itself).
        ready: dict[int, int] = {}
        deadline = time.monotonic() + READY_TIMEOUT
        while set(ready) != pids and time.monotonic() < deadline:
            holder, status = _readyz_on_one_connection(port, context, pids)
            if holder is not None and status == 200:
                ready[holder] = status
        assert set(ready) == pids, f"ready: {ready} of {pids}\n{stack.evidence()}"

        # A console session in each process (the kernel picks the process per connection).
        served: set[int] = set()
        for _ in range(24):
            if served == pids:
                break
            answer = stack.create_console_endpoint()
            assert answer["websocket"]["port"] == str(port)
            client = await use_console(
                console_url(answer, "wss"), f"https://127.0.0.1:{port}", stack, ca_pem=ca_pem
            )
            clients.append(client)
            served.add(_holder_of_connection(port, client.transport.getHost().port, pids))
        assert served == pids, f"sessions in {served} of {pids}"
        # The processes share their metrics in the unit's runtime directory (the first
        # made it; the worker was started with it in its environment).
        environ = dict(
            item.split(b"=", 1)
            for item in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
            if item
        )
        assert environ[b"PROMETHEUS_MULTIPROC_DIR"].startswith(b"/run/cpvm/cpvm-metrics-")

        # ExecReload reaches every process: each re-reads the certificate.
        def reloads() -> int:
            return sum("TLS certificate reloaded" in line for line in list(log))

        await threads.deferToThread(_exec_reload, "cpvm", main)
        deadline = time.monotonic() + 10
        while reloads() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reloads() == 2, (
            f"the unit's ExecReload made {reloads()} of 2 processes reload TLS (the first "
            f"must pass SIGHUP on to its worker, once)\n{stack.evidence()}"
        )
    finally:
        # SIGTERM to the first process only (KillMode=mixed): it stops the worker.
        await threads.deferToThread(daemon.__exit__, None, None, None)
    for client in clients:
        assert (await client.wait_closed()).code == 1001
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived SIGTERM"
    assert pids_listening_on(port) == set()


# --- Logs -----------------------------------------------------------------------------------


def test_logs_hold_no_secret(console_stack):
    """Token, VNC password, API secret, signature, proxy key: in no daemon's log."""
    stack = console_stack
    stack.resources.close()  # stops the manager and QEMU: the logs are complete
    assert set(stack.logs) == {"cpvm-manager", "cpvm", "cpvm (workers = 2)"}, (
        "the session tests did not run"
    )
    assert stack.tokens and stack.signatures
    texts = {name: "".join(lines) for name, lines in stack.logs.items()}
    texts["audit file"] = AUDIT_FILE.read_text()
    assert "console session acquired" in texts["cpvm"]
    assert "redeem" in texts["cpvm-manager"] or "/proxy/v1/" in texts["cpvm-manager"]
    leaks = [
        f"{what} in the {name} log"
        for name, text in texts.items()
        for what, secret in stack.secrets().items()
        if secret in text
    ]
    assert leaks == []
    tracebacks = [name for name, text in texts.items() if "Traceback" in text]
    assert tracebacks == [], stack.evidence()
