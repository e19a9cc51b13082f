"""QEMU as a test peer: a VNC server (VNC Authentication, VeNCrypt X509) on a free
127.0.0.1 port, optionally booting the demo guest whose shell runs on the VGA console."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.peers.processes import (
    HOST,
    INSTALL_HINT,
    REPO_ROOT,
    Peer,
    PeerUnavailable,
    Supervised,
    deadline,
    make_workdir,
    require_binary,
    write_private,
)
from tests.peers.readiness import (
    await_rfb_listener,
    free_port,
    start_with_port_retry,
    wait_for_file_text,
)

QEMU_TEST_PASSWORD = "qemupw1"
# Written to ttyS0 by the demo guest's /init once its shell runs on the VGA console.
GUEST_READY_MARKER = "cpvm-guest: shell ready"


class QemuVnc(Peer):
    """A QEMU (TCG, no disk) whose console is a VNC server on ``.port``.

    ``.display`` is the VNC display number (port - 5900), ``.password`` the VNC password or
    None, ``.tls_dir`` the X509 credentials dir or None, ``.serial_log`` the guest's serial
    output file or None. ``.monitor(cmd)`` runs a human-monitor command (e.g. ``"screendump
    /tmp/x.ppm"``, ``"sendkey ret"``, ``"change vnc password x"``) and returns its output.
    """

    def __init__(
        self,
        process: Supervised,
        port: int,
        workdir: Path,
        password: str | None,
        tls_dir: Path | None,
        serial_log: Path | None,
        monitor_path: Path,
    ) -> None:
        self.adopt(process, workdir)
        self.port = port
        self.display = port - 5900
        self.password = password
        self.tls_dir = tls_dir
        self.serial_log = serial_log
        self.monitor_path = monitor_path

    def monitor(self, command: str, timeout: float = 10.0) -> str:
        """Send one HMP command over the monitor socket; return what QEMU printed for it."""
        prompt = b"(qemu) "
        end = deadline(timeout)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.monitor_path))

            def read_until_prompt() -> bytes:
                data = b""
                while not data.endswith(prompt):
                    sock.settimeout(max(0.01, end - time.monotonic()))
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data

            read_until_prompt()  # the greeting
            sock.sendall(command.encode() + b"\n")
            out = read_until_prompt()
        # HMP echoes the command line with terminal escapes; keep only the lines after it.
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.decode(errors="replace"))
        lines = text.replace("\r", "").split("\n")
        return "\n".join(lines[1:-1]).strip()

    def wait_for_serial(self, text: str, timeout: float = 30.0) -> str:
        """Poll (bounded) the serial log until it contains *text*; return the log."""
        if self.serial_log is None:
            raise ValueError("this QEMU was started without serial_log")
        return wait_for_file_text(self.serial_log, text, timeout)


def start_qemu(
    password: str | None,
    *,
    tls_dir: Path | None = None,
    guest: tuple[Path, Path] | None = None,
    serial_log: Path | None = None,
    append: str = "console=ttyS0 console=tty0 quiet",
    timeout: float = 15.0,
) -> QemuVnc:
    """Start ``qemu-system-x86_64`` with a VNC server on a free 127.0.0.1 port.

    *password*: VNC Authentication (QEMU then offers security type 2 only), passed through a
    0600 secret file, never argv. *tls_dir*: a dir with ca-cert.pem / server-cert.pem /
    server-key.pem (see :func:`make_test_ca`) -> VeNCrypt X509 (type 19; subtype 261 with a
    password, 260 without). *guest*: ``(vmlinuz, initrd)`` to boot (e.g. the demo guest,
    :func:`demo_guest_paths`) with kernel command line *append*; without it SeaBIOS shows
    "No bootable device". *serial_log*: file receiving the guest's ttyS0.
    """
    qemu = require_binary("qemu-system-x86_64")
    if tls_dir is not None:
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
            if not (Path(tls_dir) / name).is_file():
                raise ValueError(f"tls_dir {tls_dir} has no {name}")
    if guest is not None:
        for path in guest:
            if not Path(path).is_file():
                raise PeerUnavailable(f"demo guest file {path} missing: {INSTALL_HINT}")

    def start_once() -> QemuVnc:
        workdir = make_workdir("qemu")
        port = free_port()
        while port < 5900:  # VNC display numbers start at 5900; ephemeral ports are higher
            port = free_port()
        monitor_path = workdir / "monitor.sock"
        argv = [
            qemu,
            "-machine", "pc,accel=tcg",
            "-m", "128" if guest else "64",
            "-display", "none",
            "-nodefaults",
            "-vga", "std",
            "-monitor", f"unix:{monitor_path},server=on,wait=off",
            *_vnc_options(workdir, port, password, tls_dir),
        ]  # fmt: skip
        if guest is not None:
            kernel, initrd = guest
            argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
        if serial_log is not None:
            argv += ["-serial", f"file:{serial_log}"]
        proc = Supervised("qemu", argv, workdir / "qemu.log")
        try:
            await_rfb_listener(proc, port, timeout)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return QemuVnc(proc, port, workdir, password, tls_dir, serial_log, monitor_path)

    return start_with_port_retry(start_once, what="qemu")


def _vnc_options(workdir: Path, port: int, password: str | None, tls_dir: Path | None) -> list[str]:
    """QEMU's ``-vnc`` on 127.0.0.1:port, with the password (from a 0600 file) and TLS."""
    options: list[str] = []
    vnc = f"{HOST}:{port - 5900}"
    if password is not None:
        secret = write_private(workdir / "vnc-password", password.encode())
        options += ["-object", f"secret,id=vncpw,file={secret}"]
        vnc += ",password-secret=vncpw"
    if tls_dir is not None:
        options += [
            "-object",
            f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=off",
        ]
        vnc += ",tls-creds=tls0"
    return [*options, "-vnc", vnc]


def demo_guest_paths(cache_dir: Path | None = None) -> tuple[Path, Path]:
    """``(vmlinuz, initrd.gz)`` of the demo guest built by ``scripts/build-demo-guest``."""
    if cache_dir is None:
        if os.environ.get("CPVM_GUEST_DIR"):
            cache_dir = Path(os.environ["CPVM_GUEST_DIR"])
        else:
            cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
            cache_dir = Path(cache) / "cpvm" / "guest"
    return cache_dir / "vmlinuz", cache_dir / "initrd.gz"


def build_demo_guest(cache_dir: Path | None = None, timeout: float = 300.0) -> tuple[Path, Path]:
    """Run ``scripts/build-demo-guest`` (a no-op when built) and return the guest's paths."""
    kernel, initrd = demo_guest_paths(cache_dir)
    script = REPO_ROOT / "scripts" / "build-demo-guest"
    result = subprocess.run(
        ["bash", str(script), str(kernel.parent)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0 or not (kernel.is_file() and initrd.is_file()):
        raise PeerUnavailable(
            f"building the demo guest failed ({INSTALL_HINT}):\n{result.stdout}{result.stderr}"
        )
    return kernel, initrd
