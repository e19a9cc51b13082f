"""A private libvirt daemon for tests: ``libvirtd`` in session mode with the QEMU driver.

Nothing system-wide is touched: libvirtd runs unprivileged (as ``nobody`` when the tests
run as root), which makes it a *session* daemon, with HOME, XDG_RUNTIME_DIR, XDG_CONFIG_HOME and XDG_CACHE_HOME in one
temporary directory, and its socket there too (``unix_sock_dir``); clients reach it as
``qemu+unix:///session?socket=DIR/run/libvirt-sock``. No system service, no /etc/libvirt,
no /run/libvirt. Domains are TCG guests (no /dev/kvm needed) with VNC on 127.0.0.1.

Stopping destroys every domain, stops the daemon (a session libvirtd leaves its QEMU
processes running when it exits) and kills any QEMU left by its pid file.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tests.peers import INSTALL_HINT, PeerStartError, PeerUnavailable, Supervised, require_binary

# libvirtd run by root is the system daemon: as root the tests run it as nobody, so that it
# is a session daemon; anyone else runs it as themselves.
USER = "nobody" if os.geteuid() == 0 else None


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise PeerUnavailable(f"the libvirt Python binding is missing: {INSTALL_HINT}") from None
    return libvirt


class LibvirtHost:
    """A running private libvirtd: ``.uri``, ``.connect()``, ``.stop()``."""

    def __init__(self, directory: Path, process: Supervised):
        self.dir = directory
        self.process = process
        self.socket = directory / "run" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"

    def connect(self) -> Any:
        """A new blocking connection (use it from a thread inside async tests)."""
        return _libvirt().open(self.uri)

    def file(self, name: str) -> Path:
        """A path the daemon (and its QEMU) may write: for serial logs."""
        path = self.dir / "files" / name
        return path

    def log_text(self) -> str:
        return self.process.log_tail(6000)

    def stop_daemon(self) -> None:
        """Stop libvirtd only (its running guests go on): the host goes "down"."""
        self.process.stop()

    def stop(self) -> None:
        if not self.process.exited():
            with contextlib.suppress(Exception):
                conn = self.connect()
                for dom in conn.listAllDomains():
                    with contextlib.suppress(Exception):
                        if dom.isActive():
                            dom.destroy()
                conn.close()
        self.process.stop()
        _kill_leftover_qemu(self.dir / "run" / "libvirt" / "qemu" / "run")
        shutil.rmtree(self.dir, ignore_errors=True)


def _kill_leftover_qemu(run_dir: Path) -> None:
    """QEMU processes of this daemon that outlived it, by their pid files (only ours)."""
    for pid_file in run_dir.glob("*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGKILL)


def _spawn(directory: Path) -> Supervised:
    """libvirtd as ``nobody`` with every per-user directory inside ``directory``."""
    home = directory / "home"
    env = {
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(directory / "run"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
    }
    libvirtd = require_binary("libvirtd", "/usr/sbin/libvirtd")
    return Supervised(
        "libvirtd",
        [libvirtd, "-f", str(directory / "libvirtd.conf")],
        directory / "libvirtd.log",
        env=env,
        user=USER,
        cwd=directory,
    )


def _owner() -> tuple[int, int]:
    """The uid and gid the daemon runs as."""
    if USER is None:
        return os.getuid(), os.getgid()
    entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def start_libvirtd(
    timeout: float = 30.0, *, qemu_conf: str | None = None, tls_dir: Path | None = None
) -> LibvirtHost:
    """Start the private daemon and wait until it answers. ``qemu_conf``: the QEMU
    driver's settings (the session daemon reads ``$XDG_CONFIG_HOME/libvirt/qemu.conf``);
    ``tls_dir``: a QEMU x509 directory copied where its QEMU (``nobody``) can read it, as
    ``{tls}`` in ``qemu_conf``."""
    require_binary("libvirtd", "/usr/sbin/libvirtd")
    require_binary("qemu-system-x86_64")
    libvirt = _libvirt()
    uid, gid = _owner()
    directory = Path(tempfile.mkdtemp(prefix="cpvm-libvirt-"))
    directory.chmod(0o755)  # the daemon's user must reach its own subdirectories
    for sub in ("home", "run", "files"):
        (directory / sub).mkdir()
        os.chown(directory / sub, uid, gid)
    (directory / "run").chmod(0o700)
    config = directory / "libvirtd.conf"
    config.write_text(f'unix_sock_dir = "{directory / "run"}"\n')
    if qemu_conf is not None:
        tls = directory / "files" / "tls"
        if tls_dir is not None:
            shutil.copytree(tls_dir, tls)
            for path in (tls, *tls.iterdir()):
                os.chown(path, uid, gid)
        conf_dir = directory / "home" / ".config" / "libvirt"
        conf_dir.mkdir(parents=True)
        (conf_dir / "qemu.conf").write_text(qemu_conf.replace("{tls}", str(tls)))
        for path in (conf_dir.parent, conf_dir, conf_dir / "qemu.conf"):
            os.chown(path, uid, gid)
    host = LibvirtHost(directory, _spawn(directory))
    deadline = time.monotonic() + timeout
    while True:
        if host.socket.exists():
            try:
                host.connect().close()
                return host
            except libvirt.libvirtError:
                pass
        if host.process.exited() or time.monotonic() > deadline:
            tail = host.log_text()
            host.stop()
            raise PeerStartError(f"libvirtd did not answer within {timeout} s\n{tail}")
        time.sleep(0.1)


def restart_libvirtd(host: LibvirtHost, timeout: float = 30.0) -> None:
    """Start the daemon again on the same directory (after :meth:`LibvirtHost.stop_daemon`):
    it finds its domains again, running guests included."""
    libvirt = _libvirt()
    host.process = _spawn(host.dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(libvirt.libvirtError):
            host.connect().close()
            return
        time.sleep(0.1)
    raise PeerStartError(f"libvirtd did not come back\n{host.log_text()}")


def domain_xml(
    name: str,
    *,
    port: int | None = None,
    password: str | None = None,
    guest: tuple[Path, Path] | None = None,
    serial_log: Path | None = None,
    listen: str = "127.0.0.1",
    uuid: str | None = None,
) -> str:
    """A tiny TCG domain with VNC on ``listen`` (``port`` None: libvirt picks one);
    ``uuid`` redefines an existing domain (or makes a twin)."""
    vnc = f"port='{port}' autoport='no'" if port is not None else "port='-1' autoport='yes'"
    vnc += f" listen={quoteattr(listen)}"
    if password is not None:
        vnc += f" passwd={quoteattr(password)}"
    boot = ""
    if guest is not None:
        kernel, initrd = guest
        boot = (
            f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
            "<cmdline>console=ttyS0 console=tty0 quiet</cmdline>"
        )
    serial = ""
    if serial_log is not None:
        serial = (
            f"<serial type='file'><source path={quoteattr(str(serial_log))}/>"
            "<target port='0'/></serial>"
        )
    return f"""<domain type='qemu'>
  <name>{name}</name>{f"<uuid>{uuid}</uuid>" if uuid else ""}
  <memory unit='MiB'>{128 if guest else 32}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <graphics type='vnc' {vnc}><listen type='address' address={quoteattr(listen)}/></graphics>
    <video><model type='vga'/></video>
    {serial}
    <memballoon model='none'/>
  </devices>
</domain>"""


def readable_guest(host: LibvirtHost, guest: tuple[Path, Path]) -> tuple[Path, Path]:
    """The demo guest copied where the unprivileged daemon's QEMU can read it."""
    copies = []
    for path in guest:
        copy = host.dir / "files" / path.name
        shutil.copyfile(path, copy)
        copy.chmod(0o644)
        copies.append(copy)
    return copies[0], copies[1]
