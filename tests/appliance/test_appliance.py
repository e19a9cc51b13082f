"""The console proxy VM, built by packaging/build-appliance and booted under QEMU.

One image per checkout (cached by a hash of its inputs, ``image.py``). The guest has
user-mode networking only (``vm.py``): the real manager of this checkout runs in the test's
reactor on 127.0.0.1 and the guest reaches it, and a real QEMU's password-protected VNC
server, through ``guestfwd``; the console port comes back through ``hostfwd``. The config
drive is made by packaging/make-config-drive. SSH (keys from the drive) is used only to
look inside the guest for the lock-down checks.

Boots: the good drive (console, replay, readiness, lock-down, reboot, ACPI power-down),
a malformed setting, no drive, and a fresh root disk with the first drive (an upgrade).
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests import peers
from tests.appliance.image import cached_image
from tests.appliance.vm import CONSOLE_PORT, MANAGER_ADDRESS, VNC_ADDRESS, Appliance, make_drive
from tests.manager.harness import Manager, start_manager
from tests.wsclient import RfbRefused, RfbWebSocketClient, open_console

pytestmark = pytest.mark.appliance

ACCOUNT = "appliance"
VM_NAME = "appliance-vm"
BOOT_TIMEOUT = 240.0  # TCG on a loaded machine; KVM boots in seconds
PROBED = (22, 53, 80, 443, 5355, 8000, 8080, 8250, 8443, 9090)


@dataclass
class Stack:
    manager: Manager
    qemu: peers.QemuVnc
    vm_id: str
    creds: object
    proxy_key: str
    key_file: Path
    ssh_key: Path
    image: Path
    workdir: Path

    def drive(self, name: str, *extra: str, ssh: bool = True, console_port: int) -> Path:
        args = [
            "--proxy-key",
            str(self.key_file),
            "--hostname",
            "cpvm-test-1",
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
            "--set",
            "server.grace_period=5",
            "--machine-id",
            "5eed" * 8,
            *extra,
        ]
        if ssh:
            args += ["--ssh-authorized-keys", f"{self.ssh_key}.pub"]
        return make_drive(self.workdir / f"{name}.iso", *args)

    def boot(self, drive: Path | None, console_port: int | None = None, **kw) -> Appliance:
        return Appliance(
            self.image,
            drive,
            manager_port=self.manager.port,
            vnc_port=self.qemu.port,
            console_port=console_port,
            probe_ports=PROBED,
            **kw,
        )


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building the appliance needs root (mmdebstrap)")
    return cached_image()


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(image: Path, tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("appliance")
    manager = await start_manager(workdir / "manager", {"proxies": {"heartbeat_interval": 1}})
    qemu = peers.start_qemu(peers.QEMU_TEST_PASSWORD)
    try:
        creds = manager.account(ACCOUNT)
        proxy_key = manager.proxy_key("appliance-1")
        key_file = workdir / "proxy.key"
        key_file.write_text(proxy_key + "\n")
        key_file.chmod(0o600)
        vm_id = manager.admin(
            "vm",
            "add",
            "--name",
            VM_NAME,
            "--owner",
            ACCOUNT,
            "--vnc-host",
            VNC_ADDRESS[0],
            "--vnc-port",
            str(VNC_ADDRESS[1]),
            "--vnc-password-stdin",
            "--state",
            "Running",
            stdin=peers.QEMU_TEST_PASSWORD + "\n",
        ).strip()
        ssh_key = workdir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True
        )
        yield Stack(manager, qemu, vm_id, creds, proxy_key, key_file, ssh_key, image, workdir)
    finally:
        qemu.stop()
        await manager.stop()


@pytest_twisted.async_yield_fixture(scope="module")
async def booted(stack: Stack):
    """The appliance with the good drive (and SSH keys), ready: /readyz answered 200.

    Every wait runs in a thread: the manager answering the appliance lives in this reactor.
    """
    port = peers.free_port()
    vm = stack.boot(stack.drive("good", console_port=port), console_port=port)
    try:
        await threads.deferToThread(vm.wait_ready, BOOT_TIMEOUT)
        yield vm
    finally:
        vm.stop()


def console_url(answer: dict) -> str:
    ws = answer["websocket"]
    return f"ws://{ws['host']}:{ws['port']}/{ws['path']}?" + urllib.parse.urlencode(
        {"token": ws["token"]}
    )


async def use_console(stack: Stack, vm: Appliance) -> tuple[RfbWebSocketClient, str]:
    """A signed createConsoleEndpoint, then noVNC's side through the appliance: the
    handshake and one framebuffer update from the real QEMU behind VNC authentication."""
    answer = await stack.manager.endpoint(stack.creds, stack.vm_id)  # type: ignore[arg-type]
    assert answer["success"], answer
    assert answer["websocket"]["port"] == str(vm.console_port), answer
    url = console_url(answer)
    client = await open_console(url, origin=f"http://127.0.0.1:{vm.console_port}", timeout=20)
    info = await client.rfb_handshake()
    assert info["name"] == VM_NAME.encode(), info
    client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, info["width"], info["height"]))
    head = await client.read(4, timeout=20)
    assert head[0] == 0, f"message type {head[0]}, not FramebufferUpdate"
    assert struct.unpack("!H", head[2:4])[0] >= 1
    return client, url


@pytest_twisted.ensureDeferred
async def test_console_through_the_appliance(stack: Stack, booted: Appliance):
    """A raw RFB client over the appliance's WebSocket gets the VM's screen; the token
    works once (replay refused, 4003); /readyz and the manager see a registered proxy."""
    client, url = await use_console(stack, booted)
    again = await open_console(url, origin=f"http://127.0.0.1:{booted.console_port}")
    with pytest.raises(RfbRefused, match="token already used"):
        await again.rfb_handshake()
    assert (await again.wait_closed()).code == 4003
    client.sendClose(1000)
    await client.wait_closed()
    status, body = await threads.deferToThread(booted.http, "/readyz")
    assert status == 200, body
    proxies = json.loads(stack.manager.admin("--json", "proxy", "list"))
    assert [p["status"] for p in proxies] == ["up"], proxies
    assert "cpvm-appliance: configured: host cpvm-test-1" in booted.serial


def test_serial_console_has_the_boot_log(booted: Appliance):
    """Kernel, systemd and the config unit all write to ttyS0."""
    serial = booted.serial
    assert "Linux version" in serial or "Booting" in serial or "Welcome to" in serial, serial[:2000]
    assert re.search(r"Started \S*cpvm\.service", serial), serial[-3000:]


def test_no_secret_on_the_command_line_or_in_a_readable_file(stack: Stack, booted: Appliance):
    secret = stack.proxy_key.split(".", 1)[1]
    cmdline = booted.ssh(stack.ssh_key, "cat /proc/cmdline")
    assert "console=ttyS0" in cmdline and secret not in cmdline
    assert stack.proxy_key.split(".")[0] not in cmdline
    modes = booted.ssh(stack.ssh_key, "stat -c '%a %U %G' /etc/cpvm/proxy.key /etc/cpvm/cpvm.conf")
    assert modes.split("\n")[:2] == ["600 cpvm cpvm", "640 root cpvm"], modes
    # Every file anyone may read, outside /usr (the image's, read by nobody's config) and
    # the kernel's pseudo file systems: none holds it.
    found = booted.ssh(
        stack.ssh_key,
        (
            "find / \\( -path /proc -o -path /sys -o -path /dev -o -path /usr \\) -prune -o -type f "
            f"-perm -o+r -size -2M -print0 | xargs -0 grep -lF '{secret}' || true"
        ),
        timeout=120,
    )
    assert found.strip() == "", found
    # The drive itself is readable by root (and the disk group) only.
    drive = booted.ssh(stack.ssh_key, "stat -L -c '%a %U %G' /dev/disk/by-label/CPVMCFG")
    assert drive.strip() == "660 root disk", drive


def test_only_cpvm_listens(stack: Stack, booted: Appliance):
    """In the guest: no socket listens beyond loopback but cpvm's and (with keys) sshd's.
    From the host, through hostfwd: only those two ports answer."""
    sockets = booted.ssh(stack.ssh_key, "ss -Htulnp")
    outside = []
    for line in sockets.splitlines():
        fields = line.split()
        local = fields[4]
        address = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
        if address in ("127.0.0.1", "::1", "127.0.0.53", "127.0.0.54"):
            continue
        outside.append((fields[0], local, fields[-1]))
    names = {
        (
            proto,
            local.rsplit(":", 1)[1],
            "sshd"
            if "sshd" in proc
            else "twistd"
            if "twistd" in proc
            else "networkd"
            if "systemd-network" in proc
            else proc,
        )
        for proto, local, proc in outside
    }
    # networkd's DHCP client socket (udp 68, bound to eth0) is the one other socket: a
    # client's, answered only by the DHCP server (the firewall admits sport 67 only).
    assert names == {("tcp", "22", "sshd"), ("tcp", "8080", "twistd"), ("udp", "68", "networkd")}, (
        sockets
    )
    answering = booted.answering(PROBED)
    assert answering == [22, CONSOLE_PORT], answering
    ruleset = booted.ssh(stack.ssh_key, "nft list ruleset")
    assert "policy drop" in ruleset and "tcp dport { 22, 8080 } accept" in ruleset, ruleset


def test_time_synchronisation_is_configured(stack: Stack, booted: Appliance):
    active = booted.ssh(stack.ssh_key, "systemctl is-active systemd-timesyncd.service").strip()
    assert active == "active"


@pytest_twisted.ensureDeferred
async def test_reboot_keeps_serving(stack: Stack, booted: Appliance):
    """A clean reboot from inside: configured again from the drive, registered, serving."""
    await threads.deferToThread(booted.ssh, stack.ssh_key, "systemctl reboot || true")
    await threads.deferToThread(
        booted.wait_serial, r"(?s)configured: host.*configured: host", BOOT_TIMEOUT
    )
    await threads.deferToThread(booted.wait_ready, BOOT_TIMEOUT)
    client, _url = await use_console(stack, booted)
    client.sendClose(1000)
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_acpi_power_down_drains_sessions(stack: Stack, booted: Appliance):
    """QMP system_powerdown (the ACPI power button) with a live console: the browser gets
    1001, the manager records the session's end, then the VM powers off."""
    client, _url = await use_console(stack, booted)
    answer = await threads.deferToThread(booted.qmp, "system_powerdown")
    assert "return" in answer, answer
    closed = await client.wait_closed(timeout=60)
    assert closed.code == 1001, closed
    await threads.deferToThread(booted.wait_exit, 90)
    sessions = json.loads(stack.manager.admin("--json", "session", "list"))
    last = max(sessions, key=lambda s: s["created"])
    assert last["ended"] is not None and last["reason"], last


@pytest_twisted.ensureDeferred
async def test_malformed_setting_keeps_cpvm_stopped(stack: Stack):
    port = peers.free_port()
    drive = stack.drive("bad", "--set", "session.max_sessions=lots", ssh=False, console_port=port)
    vm = stack.boot(drive, console_port=port)
    try:
        match = await threads.deferToThread(
            vm.wait_serial, r"cpvm-appliance: ERROR: [^\n]*", BOOT_TIMEOUT
        )
        assert "max_sessions" in match.group(0), match.group(0)
        await threads.deferToThread(
            vm.wait_serial, r"Dependency failed for [^\n]*cpvm", BOOT_TIMEOUT
        )
        answering = await threads.deferToThread(vm.answering, PROBED)
        assert answering == [], answering
    finally:
        vm.stop()


@pytest_twisted.ensureDeferred
async def test_missing_drive_keeps_cpvm_stopped(stack: Stack):
    vm = stack.boot(None)
    try:
        await threads.deferToThread(
            vm.wait_serial, r"cpvm-appliance: ERROR: no config drive", BOOT_TIMEOUT
        )
        await threads.deferToThread(
            vm.wait_serial, r"Dependency failed for [^\n]*cpvm", BOOT_TIMEOUT
        )
        assert not await threads.deferToThread(vm.answers, CONSOLE_PORT)
    finally:
        vm.stop()


@pytest_twisted.ensureDeferred
async def test_upgrade_is_a_new_root_disk_with_the_same_drive(stack: Stack, booted: Appliance):
    """A fresh root disk (the image as shipped) with the first boot's drive: the same
    machine id (from the drive), registered and serving."""
    port = booted.console_port  # the drive announces it
    booted.stop()  # its host port is the drive's; normally already powered off above
    vm = stack.boot(stack.workdir / "good.iso", console_port=port)
    try:
        await threads.deferToThread(vm.wait_ready, BOOT_TIMEOUT)
        machine_id = await threads.deferToThread(vm.ssh, stack.ssh_key, "cat /etc/machine-id")
        assert machine_id.strip() == "5eed" * 8
        client, _url = await use_console(stack, vm)
        client.sendClose(1000)
        await client.wait_closed()
    finally:
        vm.stop()


@pytest_twisted.ensureDeferred
async def test_uefi_boot_serves(stack: Stack, booted: Appliance):
    """The same disk under UEFI firmware (OVMF): GRUB's EFI image on the ESP boots it."""
    port = booted.console_port
    booted.stop()
    vm = stack.boot(stack.workdir / "good.iso", console_port=port, uefi=True)
    try:
        await threads.deferToThread(vm.wait_ready, BOOT_TIMEOUT)
        client, _url = await use_console(stack, vm)
        client.sendClose(1000)
        await client.wait_closed()
    finally:
        vm.stop()
