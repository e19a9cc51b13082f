"""PostgreSQL as a test peer: a throw-away cluster on 127.0.0.1 (trust auth, no fsync)."""

from __future__ import annotations

import dataclasses
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.peers.processes import (
    HOST,
    INSTALL_HINT,
    Peer,
    PeerStartError,
    PeerUnavailable,
    Supervised,
    deadline,
    make_workdir,
)
from tests.peers.readiness import (
    PortRace,
    free_port,
    pid_listens_on,
    port_in_use_failure,
    start_with_port_retry,
)


def _postgres_bindir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise PeerUnavailable(f"PostgreSQL server (postgres, initdb) not found: {INSTALL_HINT}")


class Postgres(Peer):
    """A throw-away PostgreSQL cluster on 127.0.0.1 with trust auth and database ``cpvm_test``.

    ``.dsn`` is a libpq key/value string for ``cpvm_test`` (``.url`` the same as a URL),
    ``.user`` the superuser (``postgres``), ``.socket_dir`` the unix socket directory.
    ``.create_database(name)`` makes another empty database and returns its DSN.
    """

    database = "cpvm_test"
    user = "postgres"

    def __init__(
        self, process: Supervised, port: int, workdir: Path, bindir: Path, socket_dir: Path
    ) -> None:
        self.adopt(process, workdir)
        self.port = port
        self.bindir = bindir
        self.socket_dir = socket_dir

    def dsn_for(self, database: str) -> str:
        return f"host={self.host} port={self.port} dbname={database} user={self.user}"

    @property
    def dsn(self) -> str:
        return self.dsn_for(self.database)

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def create_database(self, name: str) -> str:
        """Create empty database *name* (a plain identifier) and return its DSN."""
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"not a plain identifier: {name!r}")
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port),
             "-U", self.user, name],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        return self.dsn_for(name)


def start_postgres(tmpdir: Path | None = None, *, timeout: float = 30.0) -> Postgres:
    """initdb + start a PostgreSQL server listening on 127.0.0.1:<free port>.

    The cluster lives under *tmpdir* when the server user can use it; as root the server
    runs as the ``postgres`` system user in a private directory it owns (pytest's tmp dirs
    are root-only), removed on stop. Durability is off (fsync etc.): it is a test database.
    """
    bindir = _postgres_bindir()
    for tool in ("initdb", "pg_isready", "createdb"):
        if not (bindir / tool).exists():
            raise PeerUnavailable(f"{bindir / tool} not found: {INSTALL_HINT}")
    cluster = _new_cluster(bindir, tmpdir)
    try:
        return start_with_port_retry(lambda: _start_once(cluster, timeout), what="postgres")
    except BaseException:
        shutil.rmtree(cluster.workdir, ignore_errors=True)
        raise


@dataclasses.dataclass(frozen=True)
class _Cluster:
    """An initialised data directory, and whom the server runs as (None: as us)."""

    bindir: Path
    workdir: Path
    socket_dir: Path
    run_as: str | None
    user_kw: dict[str, Any]


def _new_cluster(bindir: Path, tmpdir: Path | None) -> _Cluster:
    run_as: str | None = None
    user_kw: dict[str, Any] = {}
    if os.geteuid() == 0:
        try:
            pwent = pwd.getpwnam("postgres")
        except KeyError:
            raise PeerUnavailable(f"no 'postgres' system user: {INSTALL_HINT}") from None
        run_as = "postgres"
        user_kw = dict(user=pwent.pw_uid, group=pwent.pw_gid, extra_groups=[])
        workdir = make_workdir("postgres")
        os.chown(workdir, pwent.pw_uid, pwent.pw_gid)
    else:
        base = Path(tmpdir) if tmpdir is not None else Path(tempfile.gettempdir())
        workdir = Path(tempfile.mkdtemp(prefix="cpvm-postgres-", dir=base))
    socket_dir = workdir / "sock"
    try:
        os.mkdir(socket_dir, 0o700)
        if run_as is not None:
            os.chown(socket_dir, user_kw["user"], user_kw["group"])
        init = subprocess.run(
            [str(bindir / "initdb"), "-D", str(workdir / "data"), "-U", Postgres.user,
             "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, timeout=120, cwd=workdir, **user_kw,
        )  # fmt: skip
        if init.returncode != 0:
            raise PeerStartError(f"initdb failed:\n{init.stdout}{init.stderr}")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return _Cluster(bindir, workdir, socket_dir, run_as, user_kw)


def _start_once(cluster: _Cluster, timeout: float) -> Postgres:
    port = free_port()
    argv = [
        str(cluster.bindir / "postgres"), "-D", str(cluster.workdir / "data"),
        "-c", f"listen_addresses={HOST}",
        "-c", f"port={port}",
        "-c", f"unix_socket_directories={cluster.socket_dir}",
        "-c", "fsync=off",
        "-c", "synchronous_commit=off",
        "-c", "full_page_writes=off",
        "-c", "max_connections=200",
    ]  # fmt: skip
    log_path = cluster.workdir / f"postgres-{port}.log"
    # SIGINT is PostgreSQL's "fast shutdown": roll back sessions, stop now.
    proc = Supervised(
        "postgres",
        argv,
        log_path,
        user=cluster.run_as,
        cwd=cluster.workdir,
        stop_signal=signal.SIGINT,
    )
    ready = _wait_ready(cluster.bindir, proc, port, timeout)
    if not ready or not pid_listens_on(proc.pid, port):
        detail = proc.log_tail()
        # Ready but not ours: someone else answers on the port. Or it could not bind.
        port_race = ready or port_in_use_failure(proc)
        proc.stop()
        if port_race:
            raise PortRace(detail)
        raise PeerStartError(f"postgres not ready on {HOST}:{port} in {timeout:g}s\n{detail}")
    peer = Postgres(proc, port, cluster.workdir, cluster.bindir, cluster.socket_dir)
    try:
        peer.create_database(Postgres.database)
    except subprocess.CalledProcessError as exc:
        peer.stop()
        raise PeerStartError(f"createdb {Postgres.database} failed: {exc.stderr!r}") from exc
    return peer


def _wait_ready(bindir: Path, proc: Supervised, port: int, timeout: float) -> bool:
    """Poll ``pg_isready`` (bounded by ``timeout``) while the server process lives."""
    end = deadline(timeout)
    while time.monotonic() < end and not proc.exited():
        check = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port), "-t", "1"],
            capture_output=True, timeout=10,
        )  # fmt: skip
        if check.returncode == 0:
            return True
        time.sleep(0.05)
    return False
