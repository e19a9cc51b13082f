"""TigerVNC's Xvnc as a test peer: an X server and VNC server (VncAuth, VeNCrypt X509 …)
on a free display and 127.0.0.1 port, with X clients (xterm) on it."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.peers.processes import (
    HOST,
    Peer,
    PeerStartError,
    Supervised,
    make_workdir,
    require_binary,
    write_private,
)
from tests.peers.readiness import await_rfb_listener, free_port, start_with_port_retry

XVNC_TEST_PASSWORD = "secret"


class Xvnc(Peer):
    """TigerVNC's ``Xvnc`` X server + VNC server: ``.display`` (X display number), ``.port``.

    ``.run_client(argv)`` starts an X client (e.g. xterm) on this display; it is stopped with
    the server. ``.password`` and ``.security_types`` are what it was started with.
    """

    def __init__(
        self,
        process: Supervised,
        port: int,
        display: int,
        workdir: Path,
        security_types: str,
        password: str | None,
    ) -> None:
        self.adopt(process, workdir)
        self.port = port
        self.display = display
        self.security_types = security_types
        self.password = password
        self._clients: list[Supervised] = []

    @property
    def display_name(self) -> str:
        """The ``DISPLAY`` value for clients, e.g. ``":123"``."""
        return f":{self.display}"

    def run_client(
        self, argv: Sequence[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """Start X client *argv* with ``DISPLAY`` set to this server; returns its Popen.

        The Popen is its ``timeout`` wrapper (terminate/kill/wait reach the client). Clients
        are stopped before the server.
        """
        client_env = dict(os.environ if env is None else env)
        client_env["DISPLAY"] = self.display_name
        client_env.pop("XAUTHORITY", None)
        name = Path(argv[0]).name
        proc = Supervised(
            f"xvnc-client-{name}",
            [require_binary(argv[0]), *argv[1:]],
            self.workdir / f"client-{len(self._clients)}-{name}.log",
            env=client_env,
        )
        self._clients.append(proc)
        return proc.wrapper

    def run_xterm(self, *extra: str, command: Sequence[str] = ("cat",)) -> subprocess.Popen:
        """Start an xterm at the top-left (100x30, DejaVu Sans Mono 14) running *command*.

        There is no window manager: focus follows the pointer, so move the pointer over the
        window before typing into it.
        """
        return self.run_client(
            ["xterm", "-geometry", "100x30+0+0", "-fa", "DejaVu Sans Mono", "-fs", "14",
             *extra, "-e", *command]
        )  # fmt: skip

    def stop(self) -> None:
        for client in reversed(self._clients):
            client.stop(grace=2.0)
        super().stop()


_XVNC_PASSWORD_TYPES = {"vncauth", "tlsvnc", "x509vnc"}
_XVNC_X509_TYPES = {"x509none", "x509vnc", "x509plain"}


def _pick_x_display() -> int:
    """A display number with no X socket or lock file (Xvnc refuses taken ones; we retry)."""
    for _ in range(200):
        display = random.randint(100, 4000)
        if not (
            Path(f"/tmp/.X11-unix/X{display}").exists() or Path(f"/tmp/.X{display}-lock").exists()
        ):
            return display
    raise PeerStartError("no free X display number found between 100 and 4000")


def start_xvnc(
    security_types: str = "VncAuth",
    password: str | None = XVNC_TEST_PASSWORD,
    *,
    x509: tuple[Path, Path] | None = None,
    geometry: str = "1024x768",
    timeout: float = 15.0,
) -> Xvnc:
    """Start TigerVNC ``Xvnc`` on a free display and a free 127.0.0.1 port.

    *security_types* is Xvnc's ``-SecurityTypes`` list, e.g. ``"VncAuth"`` -> [2], ``"None"``
    -> [1], ``"X509Vnc"`` -> [19] with VeNCrypt subtypes [261], ``"X509Vnc,VncAuth"`` -> [19, 2]
    / [261, 2]. Note ``"VeNCrypt"`` is itself type 19: ``"VeNCrypt,X509Vnc"`` offers [19, 19].
    *password* feeds
    ``-rfbauth`` (through ``vncpasswd -f`` on stdin; at most 8 characters count). *x509* is
    ``(cert.pem, key.pem)`` for the X509* types, e.g. ``(pki.server_cert, pki.server_key)``.
    """
    xvnc_bin = require_binary("Xvnc")
    types = {t.strip().lower() for t in security_types.split(",")}
    if types & _XVNC_PASSWORD_TYPES and password is None:
        raise ValueError(f"SecurityTypes {security_types} need a password")
    if types & _XVNC_X509_TYPES and x509 is None:
        raise ValueError(f"SecurityTypes {security_types} need x509=(cert, key)")

    def start_once() -> Xvnc:
        workdir = make_workdir("xvnc")
        port = free_port()
        display = _pick_x_display()
        argv = [
            xvnc_bin, f":{display}",
            "-rfbport", str(port),
            "-localhost",
            "-interface", HOST,
            "-nolisten", "tcp",
            "-SecurityTypes", security_types,
            "-geometry", geometry,
            "-depth", "24",
            "-desktop", "cpvm-test",
        ]  # fmt: skip
        if password is not None:
            vncpasswd = require_binary("vncpasswd")
            obfuscated = subprocess.run(
                [vncpasswd, "-f"], input=password.encode() + b"\n", capture_output=True,
                check=True, timeout=10,
            ).stdout  # fmt: skip
            argv += ["-rfbauth", str(write_private(workdir / "passwd", obfuscated))]
        if x509 is not None:
            argv += ["-X509Cert", str(x509[0]), "-X509Key", str(x509[1])]
        proc = Supervised("Xvnc", argv, workdir / "xvnc.log", cwd=workdir)
        try:
            await_rfb_listener(proc, port, timeout)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return Xvnc(proc, port, display, workdir, security_types, password)

    return start_with_port_retry(start_once, what="Xvnc")
