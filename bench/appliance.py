"""The appliance's targets, measured: ``python3 -m bench.appliance [--image PATH]``.

- image size: the qcow2 file as shipped (compressed), its virtual size, the root's use;
- boot to "registered with the manager": from QEMU's start until the appliance's
  ``/readyz`` answers 200 through ``hostfwd`` (cpvm answers 200 once a heartbeat reached
  the manager), under KVM (when ``/dev/kvm`` works) and under TCG, ``--boots`` times each,
  with 256 MiB of RAM and one vCPU;
- memory once ready: the guest's used and available memory and cpvm's resident set (over
  SSH, with a key on the drive);
- ``--consoles N`` (default 1,000; 0 skips it): one more boot in 256 MiB, then N idle
  consoles opened through it to ``bench.rfbserver``'s idle port on the host and held
  while the same memory figures are read (``tests/appliance/consoles.py``). The guest
  reaches that server through slirp's NAT (``host_loopback``: one ``guestfwd`` socat per
  console would be N processes on the host); the drive lifts the per-address caps that
  would refuse N consoles from one address (all come from slirp's 10.0.2.2).

A real manager (``twistd cpvm-manager`` from this checkout) runs on 127.0.0.1 and the guest
reaches it through ``guestfwd``, as in tests/appliance. Without ``--image`` the image is
the tests' cached one (built when missing: root, a few minutes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from bench.rfbserver import raise_fd_limit
from bench.run import RfbServer
from tests import peers
from tests.appliance.consoles import guest_memory, hold_idle_consoles
from tests.appliance.image import cached_image
from tests.appliance.vm import HOST_LOOPBACK, Appliance, forwarded_drive, kvm_usable
from tests.daemons import Daemon

# What N consoles from one address need (docs/operations.md names each cap); the rest of
# cpvm's settings are the appliance's defaults.
CONSOLE_SETTINGS = (
    "server.max_http_connections=0",
    "server.max_http_connections_per_address=0",
    "session.max_sessions=20000",
    "session.max_pending=20000",
    "session.failed_redemption_burst=100000",
    "session.idle_timeout=0",
)


def admin(conf: Path, *args: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from cpvm.manager.admin import main; sys.exit(main(sys.argv[1:]))",
            "--config",
            str(conf),
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=peers.REPO_ROOT,
    )
    return out.stdout.strip()


def image_figures(image: Path) -> dict:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    return {
        "file_mb": round(image.stat().st_size / 1e6, 1),
        "virtual_mb": round(info["virtual-size"] / 1e6, 1),
    }


def boot_once(
    image: Path, drive: Path, port: int, manager_port: int, accel: str, timeout: float
) -> dict:
    vm = Appliance(
        image,
        drive,
        manager_port=manager_port,
        vnc_port=1,
        console_port=port,
        accel=accel,
        probe_ports=(22,),
    )
    try:
        figures: dict = {"ready_s": round(vm.wait_ready(timeout), 2)}
        figures.update(guest_memory(vm, drive.parent / "id_ed25519"))
        return figures
    finally:
        vm.stop()


def mint_paths(manager_port: int, creds: dict, vm_id: str, n: int) -> list[str]:
    """``n`` console tokens from signed createConsoleEndpoint calls (four connections at
    a time), as the WebSocket paths a browser would open."""
    from tests.signing import DEFAULT_TTL, signed_query

    def mint(count: int) -> list[str]:
        conn = http.client.HTTPConnection("127.0.0.1", manager_port, timeout=30)
        out = []
        for _ in range(count):
            query = signed_query(
                {"command": "createConsoleEndpoint", "virtualmachineid": vm_id, "response": "json"},
                creds["apikey"],
                creds["secretkey"],
                expires_at=time.time() + DEFAULT_TTL,
            )
            conn.request("GET", "/client/api?" + urllib.parse.urlencode(query))
            body = json.loads(conn.getresponse().read())
            answer = body["createconsoleendpointresponse"]["consoleendpoint"]
            if not answer.get("success"):
                raise RuntimeError(f"createConsoleEndpoint failed: {answer}")
            ws = answer["websocket"]
            out.append(f"/{ws['path']}?" + urllib.parse.urlencode({"token": ws["token"]}))
        conn.close()
        return out

    threads = max(1, min(4, n))
    shares = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        return [path for part in pool.map(mint, shares) for path in part]


def idle_consoles(
    image: Path, manager: Daemon, creds: dict, key: Path, n: int, accel: str, timeout: float
) -> dict:
    """One boot in 256 MiB; ``n`` idle consoles through it; the guest's memory meanwhile."""
    workdir = manager.workdir
    server = RfbServer(workdir)
    try:
        vm_id = admin(
            manager.config_path,
            *("vm", "add", "--name", "bench-idle", "--owner", "bench", "--state", "Running"),
            *("--vnc-host", HOST_LOOPBACK, "--vnc-port", str(server.ports["idle"])),
        )
        port = peers.free_port()
        sets = [arg for setting in CONSOLE_SETTINGS for arg in ("--set", setting)]
        ssh_key = workdir / "id_ed25519"
        drive = forwarded_drive(
            workdir / "consoles.iso", key, port, *sets, ssh_public_key=ssh_key.with_suffix(".pub")
        )
        vm = Appliance(
            image,
            drive,
            manager_port=manager.port,
            vnc_port=1,
            console_port=port,
            accel=accel,
            probe_ports=(22,),
            memory_mb=256,
            host_loopback=True,
        )
        try:
            vm.wait_ready(timeout)
            ready = guest_memory(vm, ssh_key)
            paths = mint_paths(manager.port, creds, vm_id, n)
            held = hold_idle_consoles(
                port, paths, lambda: measure(vm, ssh_key, server), timeout=180
            )
        finally:
            vm.stop()
    finally:
        server.stop()
    figures = asdict(held)
    figures.update(memory_mb=256, ready=ready, open=figures.pop("measured"))
    return figures


def measure(vm: Appliance, ssh_key: Path, server: RfbServer) -> dict:
    """With the consoles open: the guest's memory, /readyz, the VNC server's count of open
    connections, and how long each took to answer (a guest short of memory is slow)."""
    out: dict = {}
    start = time.monotonic()
    try:
        out["memory"] = guest_memory(vm, ssh_key)
    except (AssertionError, OSError, subprocess.SubprocessError) as e:
        out["memory_error"] = repr(e)[:300]
    out["memory_answer_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    try:
        out["readyz"] = vm.http("/readyz", timeout=120)[0]
    except OSError as e:
        out["readyz_error"] = repr(e)[:300]
    out["readyz_answer_s"] = round(time.monotonic() - start, 1)
    out["vnc_server"] = server.stats()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.appliance", description=__doc__)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--no-tcg", action="store_true", help="skip the TCG boots")
    parser.add_argument("--consoles", type=int, default=1000, help="idle consoles (0: none)")
    args = parser.parse_args(argv)
    raise_fd_limit()  # QEMU inherits it: two sockets per console in its user-mode network
    image = args.image or cached_image()
    result: dict = {"image": str(image), **image_figures(image)}
    workdir = Path(peers.make_workdir("bench-appliance"))
    manager_conf = (
        f"[server]\nlisten = tcp:0:interface=127.0.0.1\ndata_dir = {workdir}/data\n"
        "[proxies]\nheartbeat_interval = 1\n"
        # A token per console, minted as fast as the manager answers, redeemed minutes later.
        "[security]\ncreate_rate = 0\n[tokens]\nttl = 3600\n"
    )
    manager = Daemon("cpvm-manager", "cpvm-manager", manager_conf, workdir=workdir)
    try:
        conf = manager.config_path
        admin(conf, "account", "create", "bench")
        creds = json.loads(admin(conf, "--json", "key", "create", "bench"))
        key = workdir / "proxy.key"
        key.write_text(admin(conf, "proxy-key", "create", "--name", "bench") + "\n")
        key.chmod(0o600)
        port = peers.free_port()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "id_ed25519")],
            check=True,
        )
        drive = forwarded_drive(
            workdir / "drive.iso", key, port, ssh_public_key=workdir / "id_ed25519.pub"
        )
        accels = (["kvm"] if kvm_usable() else []) + ([] if args.no_tcg else ["tcg"])
        for accel in accels if args.boots else []:
            timeout = 60 if accel == "kvm" else 600
            boots = [
                boot_once(image, drive, port, manager.port, accel, timeout)
                for _ in range(args.boots)
            ]
            runs = [b["ready_s"] for b in boots]
            result[f"boot_to_registered_{accel}_s"] = {
                "runs": runs,
                "min": min(runs),
                "median": sorted(runs)[len(runs) // 2],
            }
            result[f"idle_memory_{accel}"] = {k: v for k, v in boots[-1].items() if k != "ready_s"}
        if args.consoles and accels:
            accel = accels[0]
            result[f"idle_consoles_{accel}"] = idle_consoles(
                image, manager, creds, key, args.consoles, accel, 60 if accel == "kvm" else 600
            )
    finally:
        manager.stop()
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
