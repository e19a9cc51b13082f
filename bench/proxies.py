"""The relays under test, each behind one small interface (:class:`Proxy`).

``start()`` launches the relay's processes (recording their PIDs), ``targets(mode, n)``
returns ``n`` client :class:`~bench.rfbclient.Target` objects for sessions to the synthetic
server's ``mode`` port (for cpvm each needs a freshly minted one-time token), ``pids()`` are
the roots of the process trees to account, and ``stop()`` ends exactly those processes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.rfbclient import Target

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(
    check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``check()`` every 50 ms for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{tail}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _raise_nofile() -> None:  # in the child, before exec
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Process:
    """A child process in its own process group, with its log file."""

    def __init__(
        self, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None
    ):
        self.log = log
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_raise_nofile,
            env=env,
            cwd=cwd,
        )
        self.pid = self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        else:
            # The leader is gone; its group (forked children) may not be.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._logf.close()


class Proxy:
    """Interface of a relay under test."""

    name = "?"
    speaks_websocket = True
    forks_per_session = False

    def __init__(self, server_ports: dict[str, int], workdir: Path):
        self.server_ports = server_ports
        self.workdir = workdir
        self.processes: list[Process] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()
        self.processes.clear()

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def targets(self, mode: str, n: int) -> list[Target]:
        raise NotImplementedError

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


class Direct(Proxy):
    """No relay: the client speaks raw RFB to the synthetic server (the upper bound)."""

    name = "direct"
    speaks_websocket = False

    def targets(self, mode: str, n: int) -> list[Target]:
        return [Target("tcp", HOST, self.server_ports[mode])] * n


class Socat(Proxy):
    """socat, a C relay forking one process per connection; TCP on both sides."""

    name = "socat"
    speaks_websocket = False
    forks_per_session = True

    def start(self) -> None:
        self.ports = {}
        for mode, server_port in self.server_ports.items():
            if mode == "control":
                continue
            port = free_port()
            p = Process(
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind={HOST},fork,reuseaddr,backlog=4096",
                    f"TCP:{HOST}:{server_port}",
                ],
                self.workdir / f"socat-{mode}.log",
            )
            self.processes.append(p)
            self.ports[mode] = port
            wait_until(lambda port=port: port_open(port), 10, f"socat {mode}", p.proc, p.log)

    def targets(self, mode: str, n: int) -> list[Target]:
        return [Target("tcp", HOST, self.ports[mode])] * n


class Websockify(Proxy):
    """websockify 0.13 (PyPI), TokenFile plugin; forks one process per connection."""

    name = "websockify"
    forks_per_session = True

    def start(self) -> None:
        tokens = self.workdir / "websockify-tokens"
        tokens.mkdir(exist_ok=True)
        (tokens / "bench.cfg").write_text(
            "".join(
                f"{mode}: {HOST}:{port}\n"
                for mode, port in self.server_ports.items()
                if mode != "control"
            )
        )
        self.port = free_port()
        p = Process(
            [
                sys.executable,
                "-m",
                "websockify",
                "--token-plugin",
                "TokenFile",
                "--token-source",
                str(tokens),
                f"{HOST}:{self.port}",
            ],
            self.workdir / "websockify.log",
        )
        self.processes.append(p)
        wait_until(lambda: port_open(self.port), 15, "websockify", p.proc, p.log)

    def targets(self, mode: str, n: int) -> list[Target]:
        return [Target("ws", HOST, self.port, f"/?token={mode}")] * n


class Cpvm(Proxy):
    """cpvm and a real cpvm-manager (SQLite): every session redeems a one-time token.

    Tokens are minted through the signed public API (createConsoleEndpoint), one call per
    session, before the session's clock starts; :attr:`mint_seconds` accumulates the time.
    """

    name = "cpvm"

    def __init__(
        self,
        server_ports: dict[str, int],
        workdir: Path,
        workers: int = 1,
        repo: Path | None = None,
        recording: bool = False,
    ):
        super().__init__(server_ports, workdir)
        self.workers = workers
        if workers != 1:
            self.name = f"cpvm-w{workers}"
        # Every session recorded (docs/recording.md): the same run measures what it costs.
        self.recording = recording
        if recording:
            self.name = "cpvm-rec"
        self.recordings: Path | None = None
        # Another checkout of cpvm (an older commit) measured in the same run: it knows
        # none of the settings added since, so it gets only the ones it understands.
        self.repo = repo or REPO
        self.baseline = repo is not None
        if self.baseline:
            self.name = "cpvm-base"
        self.mint_seconds = 0.0
        self.minted = 0

    def _knows(self, conf: str, key: str) -> bool:
        """Whether this checkout's shipped ``etc/cpvm/<conf>`` documents ``key``: a baseline
        gets only the settings it understands (an unknown key stops start-up)."""
        if not self.baseline:
            return True
        text = (self.repo / "etc" / "cpvm" / conf).read_text()
        return re.search(rf"^[;# ]*{re.escape(key)} *=", text, re.M) is not None

    def _admin(self, *args: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from cpvm.manager.admin import main; sys.exit(main(sys.argv[1:]))",
                "--config",
                str(self.manager_conf),
                *args,
            ],
            capture_output=True,
            text=True,
            cwd=self.repo,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"cpvm-manager-admin {args}: {out.stdout}{out.stderr}")
        return out.stdout.strip()

    def start(self) -> None:
        d = Path(tempfile.mkdtemp(prefix=self.name + "-", dir=self.workdir))
        self.manager_port = free_port()
        self.manager_conf = d / "manager.conf"
        self.manager_conf.write_text(
            f"[server]\nlisten = tcp:{self.manager_port}:interface={HOST}\n"
            f"data_dir = {d / 'data'}\n[tokens]\nttl = 3600\n"
            # The bench mints a token per session as fast as it can: no rate limit.
            + (
                "[security]\ncreate_rate = 0\n"
                if self._knows("manager.conf", "create_rate")
                else ""
            )
            + "[proxies]\nheartbeat_interval = 1\nproxy_timeout = 20\n"
            + ("[recording]\ndefault = always\n" if self.recording else "")
        )
        env = dict(os.environ, PYTHONPATH=str(self.repo))
        self._admin("account", "create", "bench", "--admin")
        creds = json.loads(self._admin("--json", "key", "create", "bench"))
        self.api_key, self.secret = creds["apikey"], creds["secretkey"]
        self.vms = {}
        for mode, port in self.server_ports.items():
            if mode == "control":
                continue
            self.vms[mode] = self._admin(
                "vm",
                "add",
                "--name",
                f"bench-{mode}",
                "--owner",
                "bench",
                "--vnc-host",
                HOST,
                "--vnc-port",
                str(port),
            )
        cred = d / "proxy.key"
        self._admin("proxy-key", "create", "--name", self.name, "--output", str(cred))
        manager = Process(
            [
                sys.executable,
                "-m",
                "twisted",
                "--reactor=cpvm",
                "--log-format=text",
                "cpvm-manager",
                "--config",
                str(self.manager_conf),
            ],
            d / "manager.log",
            env,
            self.repo,
        )
        self.processes.append(manager)
        wait_until(
            lambda: port_open(self.manager_port), 20, "cpvm-manager", manager.proc, manager.log
        )
        self.port = free_port()
        conf = d / "cpvm.conf"
        conf.write_text(
            f"[server]\nbind = {HOST}\nport = {self.port}\nworkers = {self.workers}\n"
            f"public_host = {HOST}\n"
            # Every bench client comes from one address, hundreds at a time: the caps
            # against hostile clients (docs/operations.md) would refuse the load itself.
            + (
                f"state_directory = {d / 'state'}\n"
                if self._knows("cpvm.conf", "state_directory")
                else ""
            )
            + (
                "max_http_connections_per_address = 0\nmax_http_connections = 0\n"
                if self._knows("cpvm.conf", "max_http_connections_per_address")
                else ""
            )
            + f"[manager]\nurl = http://{HOST}:{self.manager_port}\ncredential_file = {cred}\n"
            "heartbeat_interval = 1\n"
            "[session]\nidle_timeout = 0\nmax_duration = 0\nmax_sessions = 20000\n"
            # Each redemption in flight spends one of the address's attempts until it
            # succeeds: hundreds at once from one address would be refused (4029).
            + (
                "max_pending = 20000\nfailed_redemption_burst = 100000\n"
                if self._knows("cpvm.conf", "failed_redemption_burst")
                else ""
            )
            + "[log]\nlevel = warn\n"
            + self._recording_section(d)
        )
        # Started like the systemd unit (twistd, not ``python -m twisted``): extra workers
        # re-run this twistd command line with ``--worker i`` (cpvm/proxy/workers.py), and
        # ``twist``'s options (--log-format, --log-level) are not twistd's.
        proxy = Process(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "--nodaemon",
                "--pidfile=",
                "--reactor=cpvm",
                f"--logger={self._logger()}",
                "cpvm",
                "--config",
                str(conf),
            ],
            d / "cpvm.log",
            env,
            self.repo,
        )
        self.processes.append(proxy)
        wait_until(
            lambda: self._http(self.port, "/readyz")[0] == 200,
            30,
            "cpvm /readyz",
            proxy.proc,
            proxy.log,
        )
        # /readyz is answered by whichever process accepted it: with workers, wait until
        # every one listens, or the first connections all land on the first process (the
        # kernel only spreads connections over sockets that exist) and stay there.
        wait_until(
            lambda: self._listening() >= self.workers,
            30,
            f"{self.workers} cpvm processes listening",
            proxy.proc,
            proxy.log,
        )
        # The manager must have seen a heartbeat before it hands out this proxy.
        wait_until(
            lambda: self._mint_one("idle") is not None,
            30,
            "first console endpoint",
            manager.proc,
            manager.log,
        )

    def _recording_section(self, d: Path) -> str:
        if not self.recording:
            return ""
        self.recordings = d / "recordings"
        # The page cache takes the stream; a larger queue rides out writeback stalls, and
        # "continue" keeps a stalled disk from ending the measured sessions (the run
        # reports whether every recording was complete).
        return (
            f"[recording]\ndirectory = {self.recordings}\non_failure = continue\n"
            "retention_days = 0\nmax_buffer = 268435456\n"
        )

    def recordings_summary(self) -> dict:
        """Bytes recorded and how many recordings failed (from cpvm's log)."""
        files = list(self.recordings.glob("*.fbs")) if self.recordings else []
        log = self.processes[1].log if len(self.processes) > 1 else None
        text = log.read_text(errors="replace") if log is not None else ""
        return {
            "rec_files": len(files),
            "rec_MB": sum(f.stat().st_size for f in files) / 1e6,
            "rec_failed": text.count("recording failed"),
        }

    def _logger(self) -> str:
        # Before the four-part layout the observer lived in cpvm/logs.py.
        flat = (self.repo / "cpvm" / "logs.py").exists()
        return "cpvm.logs.observer" if flat else "cpvm.common.logs.observer"

    def _listening(self) -> int:
        """How many processes of cpvm's tree have a socket listening on its port."""
        import psutil

        from bench.accounting import tree

        count = 0
        for p in tree([self.processes[1].pid]):
            try:
                conns = p.net_connections("tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                count += 1
        return count

    def pids(self) -> list[int]:
        # The manager is accounted separately (it is not on the relay path).
        return [self.processes[1].pid]

    def manager_pids(self) -> list[int]:
        return [self.processes[0].pid]

    @staticmethod
    def _http(port: int, path: str, conn: http.client.HTTPConnection | None = None):
        c = conn or http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            if conn is None:
                c.close()

    def _mint_one(self, mode: str, conn: http.client.HTTPConnection | None = None) -> str | None:
        from tests.signing import DEFAULT_TTL, signed_query

        query = signed_query(
            {
                "command": "createConsoleEndpoint",
                "virtualmachineid": self.vms[mode],
                "response": "json",
            },
            self.api_key,
            self.secret,
            expires_at=time.time() + DEFAULT_TTL,
        )
        status, body = self._http(
            self.manager_port, "/client/api?" + urllib.parse.urlencode(query), conn
        )
        if status != 200:
            return None
        answer = json.loads(body)["createconsoleendpointresponse"].get("consoleendpoint", {})
        if not answer.get("success"):
            return None
        return answer["websocket"]["token"]

    def targets(self, mode: str, n: int) -> list[Target]:
        start = time.perf_counter()
        threads = min(4, n)

        def mint(count: int) -> list[str]:
            conn = http.client.HTTPConnection(HOST, self.manager_port, timeout=30)
            out = []
            for _ in range(count):
                token = self._mint_one(mode, conn)
                if token is None:
                    raise RuntimeError("createConsoleEndpoint failed")
                out.append(token)
            conn.close()
            return out

        shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            tokens = [t for part in pool.map(mint, shares) for t in part]
        self.mint_seconds += time.perf_counter() - start
        self.minted += n
        # No Origin header (a non-browser client): cpvm's origin check is not exercised.
        return [
            Target("ws", HOST, self.port, "/websockify?token=" + urllib.parse.quote(t))
            for t in tokens
        ]


def make_proxy(name: str, server_ports: dict[str, int], workdir: Path) -> Proxy:
    if name == "direct":
        return Direct(server_ports, workdir)
    if name == "socat":
        return Socat(server_ports, workdir)
    if name == "websockify":
        return Websockify(server_ports, workdir)
    if name == "cpvm":
        return Cpvm(server_ports, workdir)
    if name == "cpvm-base":
        # python3 -m bench --baseline DIR: DIR is a checkout of the cpvm to compare with.
        return Cpvm(server_ports, workdir, repo=Path(os.environ["CPVM_BENCH_BASELINE"]))
    if name == "cpvm-rec":
        return Cpvm(server_ports, workdir, recording=True)
    if name.startswith("cpvm-w"):
        return Cpvm(server_ports, workdir, workers=int(name[len("cpvm-w") :]))
    raise ValueError(f"unknown proxy {name!r}")


def new_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="cpvm-bench-"))
