"""The appliance's targets, measured: ``python3 -m bench.appliance [--image PATH]``.

- image size: the qcow2 file as shipped (compressed), its virtual size, the root's use;
- boot to "registered with the manager": from QEMU's start until the appliance's
  ``/readyz`` answers 200 through ``hostfwd`` (cpvm answers 200 once a heartbeat reached
  the manager), under KVM (when ``/dev/kvm`` works) and under TCG, ``--boots`` times each,
  with 256 MiB of RAM and one vCPU;
- memory once ready: the guest's used memory (``free``) and cpvm's resident set (over SSH,
  with a key on the drive).

A real manager (``twistd cpvm-manager`` from this checkout) runs on 127.0.0.1 and the guest
reaches it through ``guestfwd``, as in tests/appliance. Without ``--image`` the image is
the tests' cached one (built when missing: root, a few minutes). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tests import peers
from tests.appliance.image import cached_image
from tests.appliance.vm import MANAGER_ADDRESS, Appliance, kvm_usable, make_drive
from tests.daemons import Daemon


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
        key = drive.parent / "id_ed25519"
        used = vm.ssh(key, "free -k | awk '/^Mem:/ {print $3}'").strip()
        rss = vm.ssh(key, "ps -o rss= -C twistd3 | awk '{s += $1} END {print s}'").strip()
        figures.update(
            guest_used_mib=round(int(used) / 1024, 1), cpvm_rss_mib=round(int(rss) / 1024, 1)
        )
        return figures
    finally:
        vm.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.appliance", description=__doc__)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--no-tcg", action="store_true", help="skip the TCG boots")
    args = parser.parse_args(argv)
    image = args.image or cached_image()
    result: dict = {"image": str(image), **image_figures(image)}
    workdir = Path(peers.make_workdir("bench-appliance"))
    manager_conf = (
        f"[server]\nlisten = tcp:0:interface=127.0.0.1\n"
        f"data_dir = {workdir}/data\n[proxies]\nheartbeat_interval = 1\n"
    )
    manager = Daemon("cpvm-manager", "cpvm-manager", manager_conf, workdir=workdir)
    try:
        conf = manager.config_path
        key = workdir / "proxy.key"
        key.write_text(admin(conf, "proxy-key", "create", "--name", "bench") + "\n")
        key.chmod(0o600)
        port = peers.free_port()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "id_ed25519")],
            check=True,
        )
        drive = make_drive(
            workdir / "drive.iso",
            "--proxy-key",
            str(key),
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
            f"server.public_port={port}",
            "--ssh-authorized-keys",
            str(workdir / "id_ed25519.pub"),
        )
        accels = (["kvm"] if kvm_usable() else []) + ([] if args.no_tcg else ["tcg"])
        for accel in accels:
            boots = [
                boot_once(
                    image, drive, port, manager.port, accel, timeout=60 if accel == "kvm" else 600
                )
                for _ in range(args.boots)
            ]
            runs = [b["ready_s"] for b in boots]
            result[f"boot_to_registered_{accel}_s"] = {
                "runs": runs,
                "min": min(runs),
                "median": sorted(runs)[len(runs) // 2],
            }
            result[f"idle_memory_{accel}"] = {
                k: boots[-1][k] for k in ("guest_used_mib", "cpvm_rss_mib")
            }
    finally:
        manager.stop()
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
