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
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from bench.run import RfbServer
from tests import peers
from tests.appliance.compare import compare_images
from tests.appliance.consoles import guest_memory, hold_idle_consoles
from tests.appliance.image import cached_image
from tests.appliance.vm import (
    CONSOLE_PORT,
    IDLE_VNC_ADDRESS,
    VNC_ADDRESS,
    Appliance,
    forwarded_drive,
)
from tests.manager.harness import Manager, start_manager
from tests.wsclient import RfbRefused, RfbWebSocketClient, open_console

pytestmark = pytest.mark.appliance

ACCOUNT = "appliance"
VM_NAME = "appliance-vm"
IDLE_VM_NAME = "appliance-idle"
IDLE_CONSOLES = 50
BOOT_TIMEOUT = 240.0  # TCG on a loaded machine; KVM boots in seconds
PROBED = (22, 53, 80, 443, 5355, 8000, 8080, 8250, 8443, 9090)


@dataclass
class Stack:
    manager: Manager
    qemu: peers.QemuVnc
    idle_server: RfbServer
    vm_id: str
    idle_vm_id: str
    creds: object
    proxy_key: str
    key_file: Path
    ssh_key: Path
    image: Path
    second_image: Path | BaseException
    workdir: Path

    def drive(self, name: str, *extra: str, ssh: bool = True, console_port: int) -> Path:
        return forwarded_drive(
            self.workdir / f"{name}.iso",
            self.key_file,
            console_port,
            "--hostname",
            "cpvm-test-1",
            "--set",
            "server.grace_period=5",
            "--machine-id",
            "5eed" * 8,
            *extra,
            ssh_public_key=self.ssh_key.with_suffix(".pub") if ssh else None,
        )

    def boot(
        self, drive: Path | None, console_port: int | None = None, image: Path | None = None, **kw
    ) -> Appliance:
        return Appliance(
            image or self.image,
            drive,
            manager_port=self.manager.port,
            vnc_port=self.qemu.port,
            idle_vnc_port=self.idle_server.ports["idle"],
            console_port=console_port,
            probe_ports=PROBED,
            **kw,
        )


@pytest.fixture(scope="module")
def image() -> Path:
    if os.geteuid() != 0:
        pytest.skip("building the appliance needs root (mmdebstrap)")
    return cached_image()


@pytest.fixture(scope="module")
def second_image(image: Path) -> Path | BaseException:
    """The second build of this commit, made before anything boots (the build and the
    guests would share the cores); a failed build fails only the test that boots it."""
    try:
        return cached_image("second")
    except (AssertionError, OSError, subprocess.SubprocessError) as e:
        return e


@pytest_twisted.async_yield_fixture(scope="module")
async def stack(
    image: Path,
    second_image: Path | BaseException,
    demo_guest: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
):
    workdir = tmp_path_factory.mktemp("appliance")
    manager = await start_manager(
        workdir / "manager",
        # No rate limit on createConsoleEndpoint: the idle-console test asks for dozens.
        {"proxies": {"heartbeat_interval": 1}, "security": {"create_rate": 0}},
    )
    qemu = peers.start_qemu(
        peers.QEMU_TEST_PASSWORD, guest=demo_guest, serial_log=workdir / "guest-serial.log"
    )
    idle_server = RfbServer(workdir)
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
        idle_vm_id = manager.admin(
            "vm",
            "add",
            "--name",
            IDLE_VM_NAME,
            "--owner",
            ACCOUNT,
            "--vnc-host",
            IDLE_VNC_ADDRESS[0],
            "--vnc-port",
            str(IDLE_VNC_ADDRESS[1]),
            "--state",
            "Running",
        ).strip()
        ssh_key = workdir / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh_key)], check=True
        )
        yield Stack(
            manager,
            qemu,
            idle_server,
            vm_id,
            idle_vm_id,
            creds,
            proxy_key,
            key_file,
            ssh_key,
            image,
            second_image,
            workdir,
        )
    finally:
        idle_server.stop()
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


# Waits are functions, never expression strings: Playwright polls a string with eval, which
# cpvm's Content-Security-Policy forbids.
CONNECTED = (
    "() => !!document.querySelector('#noVNC_status') && "
    "document.querySelector('#noVNC_status').textContent.startsWith('Connected')"
)
# Typed into the demo guest's shell; "serial" copies its words to the guest's ttyS0. Capitals
# prove that Shift reaches the VM.
TYPED = "serial Typed Through The Appliance 42"


def type_as_a_keyboard(page, text: str) -> None:
    """Type ``text`` key by key as a person does: a capital is Shift down, the key, Shift
    up (Playwright's ``keyboard.type`` sends the capital's key alone, and QEMU, which
    works from key codes, then types the small letter)."""
    for char in text:
        if char.isupper():
            page.keyboard.down("Shift")
            page.keyboard.press(char)
            page.keyboard.up("Shift")
        else:
            page.keyboard.press("Space" if char == " " else char)
        time.sleep(0.03)
    page.keyboard.press("Enter")


def type_in_novnc(url: str, text: str, screenshot: Path) -> str:
    """noVNC (served by the appliance) in headless Chromium: connect, click the screen,
    type ``text``; returns noVNC's status line once connected."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = peers.launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_function(CONNECTED, timeout=60_000)
            status = page.inner_text("#noVNC_status")
            page.locator("#noVNC_container canvas").click()
            time.sleep(0.5)
            type_as_a_keyboard(page, text)
            time.sleep(1.0)
            page.screenshot(path=str(screenshot))
            return status
        finally:
            browser.close()


@pytest_twisted.ensureDeferred
async def test_novnc_in_chromium_types_into_the_vm(stack: Stack, booted: Appliance):
    """The page the manager's answer points at (the appliance's noVNC), in Chromium,
    through the appliance to the password-protected QEMU: what is typed reaches the VM's
    shell, capitals included."""
    await threads.deferToThread(stack.qemu.wait_for_serial, peers.GUEST_READY_MARKER, 180)
    answer = await stack.manager.endpoint(stack.creds, stack.vm_id)  # type: ignore[arg-type]
    assert answer["success"], answer
    assert answer["url"].startswith(f"http://127.0.0.1:{booted.console_port}/"), answer["url"]
    shot = stack.workdir / "novnc.png"
    status = await threads.deferToThread(type_in_novnc, answer["url"], TYPED, shot)
    assert status.startswith("Connected") and VM_NAME in status, status
    words = TYPED.split(" ", 1)[1]
    await threads.deferToThread(stack.qemu.wait_for_serial, words, 30)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


def ws_path(answer: dict) -> str:
    ws = answer["websocket"]
    return f"/{ws['path']}?" + urllib.parse.urlencode({"token": ws["token"]})


async def serve_one(stack: Stack, vm: Appliance) -> bool:
    client, _url = await use_console(stack, vm)
    client.sendClose(1000)
    await client.wait_closed()
    return True


@pytest_twisted.ensureDeferred
async def test_idle_consoles_in_256_mib(stack: Stack, booted: Appliance):
    """IDLE_CONSOLES idle consoles (to bench.rfbserver's idle port) held open through the
    appliance in 256 MiB: all stay open, nothing is killed for memory, and meanwhile the
    appliance is ready and serves one more console (to the real QEMU). The figures are
    printed (``-rP``); bench.appliance measures 1,000."""
    assert booted.memory_mb == 256
    paths = []
    for _ in range(IDLE_CONSOLES):
        answer = await stack.manager.endpoint(stack.creds, stack.idle_vm_id)  # type: ignore[arg-type]
        assert answer["success"], answer
        paths.append(ws_path(answer))
    before = await threads.deferToThread(guest_memory, booted, stack.ssh_key)

    def while_open() -> tuple[dict, int, bool, dict]:
        memory = guest_memory(booted, stack.ssh_key)
        ready = booted.http("/readyz")[0]
        served = threads.blockingCallFromThread(
            reactor, lambda: defer.ensureDeferred(serve_one(stack, booted))
        )
        return memory, ready, served, stack.idle_server.stats()

    held = await threads.deferToThread(hold_idle_consoles, booted.console_port, paths, while_open)
    assert held.opened == IDLE_CONSOLES and held.alive == IDLE_CONSOLES, held
    memory, ready, served, vnc = held.measured
    print(f"appliance figures: {IDLE_CONSOLES} idle consoles: before {before}, open {memory}")
    assert vnc["active"] >= IDLE_CONSOLES, vnc
    assert ready == 200 and served
    assert memory["mem_total_mib"] <= 256 and memory["oom_kills"] == 0, memory


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


# The project's own files in the image: two builds of one commit must agree on them.
PROJECT_PATHS = (
    "/usr/lib/python3/dist-packages/cpvm",  # the package and its dist-info
    "/usr/lib/python3/dist-packages/twisted/plugins/cpvm",
    "/usr/lib/systemd/system/cpvm",
    "/usr/bin/cpvm",
    "/usr/lib/cpvm-appliance",
    "/usr/share/doc/cpvm",
    "/etc/cpvm",
    "/etc/systemd/system",
    "/etc/nftables.conf",
)


@pytest_twisted.ensureDeferred
async def test_second_image_of_the_same_commit_is_an_upgrade_under_uefi(
    stack: Stack, booted: Appliance
):
    """A second build of this commit (cached apart): its files compared with the first's
    (the project's must match; every difference is printed, ``-rP``), then booted on a
    fresh root disk with the first boot's drive, under UEFI firmware (OVMF: GRUB's EFI image
    on the ESP) — one boot for three claims, as boots are what the suite spends its time
    on: an upgrade keeps the machine id (from the drive) and the same proxy to the manager,
    registered and serving; the second build works; the disk boots under UEFI too."""
    if isinstance(stack.second_image, BaseException):
        raise stack.second_image
    comparison = await threads.deferToThread(compare_images, stack.image, stack.second_image)
    print("appliance figures: second image:", json.dumps(comparison.summary()))
    differing = comparison.only_in_first + comparison.only_in_second + comparison.content_differs
    assert [p for p in differing if p.startswith(PROJECT_PATHS)] == [], comparison.summary()
    proxies_before = json.loads(stack.manager.admin("--json", "proxy", "list"))
    port = booted.console_port  # the drive announces it
    booted.stop()
    vm = stack.boot(
        stack.workdir / "good.iso", console_port=port, image=stack.second_image, uefi=True
    )
    try:
        await threads.deferToThread(vm.wait_ready, BOOT_TIMEOUT)
        machine_id = await threads.deferToThread(vm.ssh, stack.ssh_key, "cat /etc/machine-id")
        assert machine_id.strip() == "5eed" * 8
        client, _url = await use_console(stack, vm)
        client.sendClose(1000)
        await client.wait_closed()
        proxies = json.loads(stack.manager.admin("--json", "proxy", "list"))
        assert [(p["id"], p["name"]) for p in proxies] == [
            (p["id"], p["name"]) for p in proxies_before
        ], (proxies_before, proxies)
        assert [p["status"] for p in proxies] == ["up"], proxies
    finally:
        vm.stop()
