"""The whole system on one machine: manager, cpvm, a demo VM, and a console URL to open.

Run through ``scripts/demo`` (which installs what is needed first). Everything listens on
127.0.0.1 unless ``--public-host``/``--bind`` say otherwise; state lives in a fresh
directory; Ctrl-C (or SIGTERM) stops every process this script started.

    scripts/demo            start everything, print a console URL, keep running
    scripts/demo url        print a fresh one-time URL for the running demo
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cpvm.manager.signing import sign  # noqa: E402  (the same signing any API client does)

STATE = Path(os.environ.get("CPVM_DEMO_DIR", "/var/tmp/cpvm-demo"))
GUEST = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cpvm" / "guest"
TWISTD = [
    sys.executable,
    "-c",
    "from twisted.scripts.twistd import run; run()",
    "--nodaemon",
    "--pidfile=",
    "--reactor=cpvm",
]


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"demo: {log.name} exited; its log:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    sys.exit(f"demo: {url} did not answer within {timeout:.0f} s; see {log}")


def admin(*args: str, stdin: str | None = None) -> str:
    cmd = [
        sys.executable,
        "-m",
        "cpvm.manager.admin",
        "--config",
        str(STATE / "manager.conf"),
        *args,
    ]
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=REPO, env=_env())
    if done.returncode != 0:
        sys.exit(f"demo: cpvm-manager-admin {' '.join(args[:2])} failed:\n{done.stderr}")
    return done.stdout


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def console_url(settings: dict) -> dict:
    """Call createConsoleEndpoint like any CloudStack API client would."""
    params = {
        "command": "createConsoleEndpoint",
        "virtualmachineid": settings["vm_id"],
        "response": "json",
        "apiKey": settings["api_key"],
        "signatureVersion": "3",
        "expires": time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(time.time() + 300)),
    }
    params["signature"] = sign(params, settings["secret_key"])
    url = f"http://127.0.0.1:{settings['manager_port']}/client/api?" + urllib.parse.urlencode(
        params
    )
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.load(r)["createconsoleendpointresponse"]["consoleendpoint"]
    if not answer.get("success"):
        sys.exit(f"demo: createConsoleEndpoint failed: {answer.get('details')}")
    return answer


def start(args: argparse.Namespace) -> None:
    if not (GUEST / "vmlinuz").exists():
        subprocess.run([str(REPO / "scripts" / "build-demo-guest")], check=True)
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True, mode=0o700)
    logs = STATE / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def stop(*_):
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        say("stopped")
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def spawn(name: str, argv: list[str]) -> tuple[subprocess.Popen, Path]:
        log = logs / f"{name}.log"
        p = subprocess.Popen(
            argv,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=STATE,
            env=_env(),
        )
        procs.append(p)
        return p, log

    # 1. The management endpoint on SQLite.
    (STATE / "manager.conf").write_text(
        f"[server]\nlisten = tcp:{args.manager_port}:interface=127.0.0.1\n"
        f"data_dir = {STATE / 'manager'}\n[proxies]\nheartbeat_interval = 2\n"
    )
    admin("account", "create", "demo")
    keys = json.loads(admin("--json", "key", "create", "demo"))
    admin("proxy-key", "create", "--name", "demo-cpvm", "--output", str(STATE / "proxy.key"))
    vnc_password = secrets.token_urlsafe(6)[:8]
    pw_file = STATE / "vnc.password"
    pw_file.write_text(vnc_password)
    pw_file.chmod(0o600)
    vm_id = admin(
        "vm",
        "add",
        "--name",
        "demo-vm",
        "--owner",
        "demo",
        "--vnc-host",
        "127.0.0.1",
        "--vnc-port",
        str(5900 + args.vnc_display),
        "--vnc-password-file",
        str(pw_file),
        "--state",
        "Running",
    ).strip()
    manager, manager_log = spawn(
        "manager", TWISTD + ["cpvm-manager", "--config", str(STATE / "manager.conf")]
    )
    wait_http(f"http://127.0.0.1:{args.manager_port}/healthz", 30, manager, manager_log)
    say(f"manager on 127.0.0.1:{args.manager_port} (SQLite in {STATE / 'manager'})")

    # 2. A demo VM: QEMU booting a tiny Linux, its VNC console behind a password.
    qemu, qemu_log = spawn(
        "qemu",
        [
            "qemu-system-x86_64",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "128",
            "-display",
            "none",
            "-nodefaults",
            "-vga",
            "std",
            "-kernel",
            str(GUEST / "vmlinuz"),
            "-initrd",
            str(GUEST / "initrd.gz"),
            "-append",
            "console=ttyS0 console=tty0 quiet",
            "-serial",
            f"file:{STATE / 'serial.log'}",
            "-object",
            f"secret,id=vncpw,file={pw_file}",
            "-vnc",
            f"127.0.0.1:{args.vnc_display},password-secret=vncpw",
        ],
    )
    say(f"demo VM on VNC 127.0.0.1:{5900 + args.vnc_display} (password-protected)")

    # 3. cpvm, plain HTTP and WebSocket.
    (STATE / "cpvm.conf").write_text(
        f"[server]\nbind = {args.bind}\nport = {args.http_port}\n"
        f"public_host = {args.public_host}\nstate_directory = {STATE / 'cpvm'}\n"
        f"[manager]\nurl = http://127.0.0.1:{args.manager_port}\n"
        f"credential_file = {STATE / 'proxy.key'}\nheartbeat_interval = 2\n"
    )
    cpvm, cpvm_log = spawn("cpvm", TWISTD + ["cpvm", "--config", str(STATE / "cpvm.conf")])
    wait_http(f"http://127.0.0.1:{args.http_port}/readyz", 30, cpvm, cpvm_log)
    say(f"cpvm on {args.bind}:{args.http_port}, registered with the manager")

    settings = {
        "vm_id": vm_id,
        "api_key": keys["apikey"],
        "secret_key": keys["secretkey"],
        "manager_port": args.manager_port,
    }
    settings_file = STATE / "demo.json"
    settings_file.write_text(json.dumps(settings))
    settings_file.chmod(0o600)
    # cpvm registers with its first heartbeat; createConsoleEndpoint needs it alive.
    answer = console_url(settings)
    print()
    print("Open this console URL in a browser (it works once):")
    print()
    print(f"  {answer['url']}")
    print()
    print(f"Another URL: scripts/demo url     Logs: {logs}     Stop: Ctrl-C")
    sys.stdout.flush()
    if args.url_file:
        Path(args.url_file).write_text(json.dumps(answer))
    while True:
        for p in procs:
            if p.poll() is not None:
                say(f"a process exited ({p.args[3] if len(p.args) > 3 else p.args[0]}); see {logs}")
                stop()
        time.sleep(1)


def new_url(_args: argparse.Namespace) -> None:
    settings = json.loads((STATE / "demo.json").read_text())
    print(console_url(settings)["url"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", nargs="?", default="start", choices=["start", "url"])
    parser.add_argument("--http-port", type=int, default=8080)
    parser.add_argument("--manager-port", type=int, default=8250)
    parser.add_argument("--vnc-display", type=int, default=50)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument(
        "--public-host", default="127.0.0.1", help="host name the browser uses to reach cpvm"
    )
    parser.add_argument("--url-file", help="also write the first answer here (JSON)")
    args = parser.parse_args()
    (new_url if args.command == "url" else start)(args)


if __name__ == "__main__":
    main()
