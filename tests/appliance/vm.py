"""The appliance booted under QEMU with user-mode networking only.

The guest reaches nothing but what the test forwards: ``restrict=on`` cuts it off from the
host and the outside; ``guestfwd`` connects 10.0.2.100:8250 (the manager), 10.0.2.101:5901
(the VNC server) and optionally 10.0.2.102:5902 (an idle RFB server) to services on the
host's loopback, one ``socat`` per connection; ``hostfwd`` puts guest ports on 127.0.0.1
(the console port, and any others a test wants to probe).
The root disk is a qcow2 overlay of the cached image, so every boot starts from the image
as shipped (or from a previous boot's overlay, for reboots).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.peers import REPO_ROOT, Supervised, free_port, make_workdir

MANAGER_ADDRESS = ("10.0.2.100", 8250)
VNC_ADDRESS = ("10.0.2.101", 5901)
IDLE_VNC_ADDRESS = ("10.0.2.102", 5902)  # bench.rfbserver's idle port, when given
HOST_LOOPBACK = "10.0.2.2"  # slirp's address of the host's 127.0.0.1 (host_loopback=True)
CONSOLE_PORT = 8080
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


def kvm_usable() -> bool:
    """KVM that runs a guest: /dev/kvm opens *and* the CPU has hardware virtualisation.

    Some nested set-ups (a Firecracker VM, say) offer /dev/kvm without vmx/svm in the CPU
    flags: SeaBIOS runs, then GRUB and Linux hang as soon as they leave real mode. Those get
    TCG. ``CPVM_APPLIANCE_ACCEL=kvm|tcg`` overrides the guess.
    """
    forced = os.environ.get("CPVM_APPLIANCE_ACCEL")
    if forced:
        return forced == "kvm"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return bool(flags & {"vmx", "svm"})


def make_drive(path: Path, *args: str) -> Path:
    """packaging/make-config-drive PATH ARGS... (the documented command)."""
    subprocess.run(
        [str(REPO_ROOT / "packaging" / "make-config-drive"), str(path), *args],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def forwarded_drive(
    path: Path,
    proxy_key: Path,
    console_port: int,
    *extra: str,
    ssh_public_key: Path | None = None,
) -> Path:
    """A config drive for a test or bench boot: the manager on the host (``MANAGER_ADDRESS``
    through guestfwd, plain HTTP), one-second heartbeats, and the console announced as
    127.0.0.1:``console_port`` (the hostfwd). ``extra``: more make-config-drive arguments;
    ``ssh_public_key`` enables sshd with that key."""
    args = [
        "--proxy-key",
        str(proxy_key),
        "--set",
        f"manager.url=http://{MANAGER_ADDRESS[0]}:{MANAGER_ADDRESS[1]}",
        # The test manager is on the host's loopback behind QEMU's guestfwd, plain HTTP;
        # cpvm refuses that off loopback unless told (a real appliance uses https).
        "--set",
        "manager.allow_plaintext=true",
        "--set",
        "manager.heartbeat_interval=1",
        "--set",
        "server.public_host=127.0.0.1",
        "--set",
        f"server.public_port={console_port}",
        *extra,
    ]
    if ssh_public_key is not None:
        args += ["--ssh-authorized-keys", str(ssh_public_key)]
    return make_drive(path, *args)


class Appliance:
    """One boot of the appliance; ``.serial`` is the serial console's text so far."""

    def __init__(
        self,
        image: Path,
        drive: Path | None,
        *,
        manager_port: int,
        vnc_port: int,
        console_port: int | None = None,
        disk: Path | None = None,
        probe_ports: tuple[int, ...] = (),
        memory_mb: int = 256,
        accel: str | None = None,
        uefi: bool = False,
        idle_vnc_port: int | None = None,
        host_loopback: bool = False,
    ) -> None:
        self.workdir = make_workdir("appliance")
        self.memory_mb = memory_mb
        self.disk = disk or self.workdir / "root.qcow2"
        if disk is None:
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    str(image),
                    str(self.disk),
                ],
                check=True,
            )
        self.serial_log = self.workdir / "serial.log"
        self.qmp_path = self.workdir / "qmp.sock"
        self.console_port = console_port or free_port()
        self.forwards = {CONSOLE_PORT: self.console_port}
        self.forwards.update({p: free_port() for p in probe_ports if p != CONSOLE_PORT})
        # host_loopback: slirp's NAT instead of restrict=on, so the guest reaches the host's
        # 127.0.0.1 at HOST_LOOPBACK (bench.appliance's 1,000 consoles: one socat process
        # per guestfwd connection would be a thousand processes).
        nic = ["user", "model=virtio-net-pci", f"restrict={'off' if host_loopback else 'on'}"]
        nic += [f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for g, h in self.forwards.items()]
        services = [(MANAGER_ADDRESS, manager_port), (VNC_ADDRESS, vnc_port)]
        if idle_vnc_port is not None:
            services.append((IDLE_VNC_ADDRESS, idle_vnc_port))
        for (addr, port), target in services:
            nic.append(f"guestfwd=tcp:{addr}:{port}-cmd:socat - TCP:127.0.0.1:{target}")
        self.accel = accel or ("kvm" if kvm_usable() else "tcg")
        argv = [
            "qemu-system-x86_64",
            "-machine",
            f"q35,accel={self.accel}",
            "-m",
            str(memory_mb),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-drive",
            f"file={self.disk},if=virtio,format=qcow2",
            "-nic",
            ",".join(nic),
            "-serial",
            f"file:{self.serial_log}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if drive is not None:
            argv += ["-drive", f"file={drive},if=virtio,format=raw,readonly=on"]
        if uefi:  # OVMF (Debian's ovmf), with a private copy of its variable store
            shutil.copy(OVMF_VARS, self.workdir / "vars.fd")
            argv += [
                "-drive",
                f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive",
                f"if=pflash,format=raw,file={self.workdir / 'vars.fd'}",
            ]
        self.started = time.monotonic()
        self.process = Supervised("appliance", argv, self.workdir / "qemu.log")

    @property
    def serial(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, pattern: str, timeout: float) -> re.Match[str]:
        """Poll the serial log for ``pattern`` (a regex), at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.serial)
            if match:
                return match
            if self.process.exited():
                break
            time.sleep(0.2)
        raise AssertionError(
            f"no {pattern!r} on the serial console within {timeout} s; "
            f"tail:\n{self.serial[-3000:]}\n{self.process.log_tail()}"
        )

    def http(self, path: str, port: int | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        """One HTTP/1.0 GET through the console port's hostfwd: (status, body)."""
        with socket.create_connection(
            ("127.0.0.1", port or self.console_port), timeout=timeout
        ) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if not data:
            return 0, b""
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def wait_ready(self, timeout: float) -> float:
        """Poll /readyz until 200; seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline and not self.process.exited():
            try:
                status, body = self.http("/readyz", timeout=2)
                if status == 200:
                    return time.monotonic() - self.started
                last = (status, body[:200])
            except OSError as e:
                last = e
            time.sleep(0.25)
        raise AssertionError(
            f"/readyz not 200 within {timeout} s (last: {last}); serial tail:\n"
            f"{self.serial[-3000:]}"
        )

    def qmp(self, command: str, **arguments: object) -> dict:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.qmp_path))
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                f.write(json.dumps({"execute": cmd, "arguments": args}) + "\n")
                f.flush()
                while True:
                    answer = json.loads(f.readline())
                    if "event" not in answer:
                        break
            return answer

    def wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.process.exited():
            time.sleep(0.2)
        assert self.process.exited(), f"QEMU still running after {timeout} s"

    def ssh(self, key: Path, command: str, timeout: float = 30, connect_timeout: int = 10) -> str:
        """Run ``command`` as root over SSH (port 22 forwarded; the drive gave the key)."""
        result = subprocess.run(
            [
                "ssh",
                "-i",
                str(key),
                "-p",
                str(self.forwards[22]),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                f"ConnectTimeout={connect_timeout}",
                "root@127.0.0.1",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, (command, result.returncode, result.stderr)
        return result.stdout

    def answers(self, guest_port: int, timeout: float = 4.0) -> bool:
        """Does anything answer on ``guest_port`` (through its hostfwd)? A service sends
        a banner or answers an HTTP request; a closed or filtered port gives nothing."""
        try:
            with socket.create_connection(
                ("127.0.0.1", self.forwards[guest_port]), timeout=timeout
            ) as s:
                s.settimeout(timeout)
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                return bool(s.recv(1))
        except OSError:
            return False

    def answering(self, ports: tuple[int, ...]) -> list[int]:
        """The ports of ``ports`` that answer, probed in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(ports)) as pool:
            return [p for p, ok in zip(ports, pool.map(self.answers, ports), strict=True) if ok]

    def stop(self) -> None:
        self.process.stop(grace=5)
