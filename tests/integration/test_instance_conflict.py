"""One proxy key, two running cpvm processes (issue 15), against the real daemons.

A real manager service (in the test reactor), real ``twistd cpvm`` processes sharing one
proxy key with different state directories (hence instance ids), QEMU as the VNC server:
the second is refused and not ready while the first keeps serving, untouched; when the
first stops, the second takes over within ``proxy_timeout``; a restart of an instance
(same state directory, new process, also after SIGKILL) is accepted at once.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task, threads

from tests.daemons import Daemon, PeerStartError, cpvm_config, start_cpvm
from tests.integration.test_console_path import full_update
from tests.manager.harness import start_manager
from tests.peers import QEMU_TEST_PASSWORD, free_port
from tests.wsclient import RfbRefused, open_console

PROXY_TIMEOUT = 4


async def _sleep(seconds: float) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


async def _readyz(cpvm: Daemon) -> tuple[int, str]:
    r = await treq.get(cpvm.url("/readyz"), persistent=False)
    return r.code, await r.text()


async def _until(check, what: str, timeout: float = 30.0):
    """Poll ``check`` (async, truthy when done) with a bound; its last value."""
    deadline = reactor.seconds() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert reactor.seconds() < deadline, f"not within {timeout} s: {what}"
        await _sleep(0.2)


def _instance_id(state: Path) -> str:
    return json.loads((state / "instance-id").read_text())["instance_id"]


def _proxy_row(m) -> dict:
    return json.loads(m.admin("--json", "proxy", "list"))[0]


async def _conflicts(m) -> float:
    r = await treq.get(m.base + "/metrics", persistent=False)
    for line in (await r.text()).splitlines():
        if line.startswith('cpvm_manager_instance_conflicts_total{endpoint="heartbeat"}'):
            return float(line.split()[-1])
    return 0.0


class Proxies:
    """cpvm processes on one key; each with the state directory it is given."""

    def __init__(self, tmp_path: Path, manager_url: str, key_file: Path):
        self.tmp_path = tmp_path
        self.manager_url = manager_url
        self.key_file = key_file
        self.started: list[Daemon] = []

    async def start(self, state: Path) -> Daemon:
        # A fixed port: the real manager refuses a heartbeat announcing public port 0.
        text = cpvm_config(
            self.manager_url,
            credential_file=self.key_file,
            server={"state_directory": state, "port": free_port()},
        )
        workdir = self.tmp_path / f"cpvm{len(self.started)}"
        workdir.mkdir()
        # Blocking start-up (reads the log for the port) off the reactor, which runs the
        # manager the new process heartbeats to.
        daemon = await threads.deferToThread(
            start_cpvm, text, workdir=workdir, extra_args=("--logger=cpvm.common.logs.observer",)
        )
        self.started.append(daemon)
        return daemon

    async def stop(self, daemon: Daemon) -> None:
        await threads.deferToThread(daemon.stop)


async def _console(cpvm: Daemon, token: str):
    client = await open_console(f"ws://127.0.0.1:{cpvm.port}/websockify?token={token}")
    info = await client.rfb_handshake()
    return client, info


@pytest_twisted.ensureDeferred
async def test_one_key_two_running_proxies(tmp_path, qemu_vnc):
    m = await start_manager(
        tmp_path / "manager",
        {"proxies": {"proxy_timeout": str(PROXY_TIMEOUT), "heartbeat_interval": "1"}},
    )
    proxies = None
    try:
        alice = m.account("alice")
        vm = m.vm(
            "alice",
            name="qemu",
            password=QEMU_TEST_PASSWORD,
            vnc_host="127.0.0.1",
            vnc_port=str(qemu_vnc.port),
        )
        key = m.proxy_key("shared")
        key_id = key[len("cpvmk_") :].split(".", 1)[0]
        key_file = tmp_path / "proxy.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        proxies = Proxies(tmp_path, m.base, key_file)
        state1, state2 = tmp_path / "state1", tmp_path / "state2"

        first = await proxies.start(state1)
        await _until(lambda: _ready(first), "the first cpvm is ready")
        answer = await m.endpoint(alice, vm)
        assert answer["websocket"]["port"] == str(first.port)
        console, info = await _console(first, answer["websocket"]["token"])
        assert await full_update(console, info) > 0
        (session_id,) = [s["id"] for s in await _live_sessions(m, alice)]

        # The same key on a second running instance (a cloned appliance).
        second = await proxies.start(state2)
        assert _instance_id(state1) != _instance_id(state2)
        status, text = await _until(
            lambda: _not_ready_conflict(second), "the second cpvm reports the conflict"
        )
        assert status == 503 and f"proxy key {key_id} is in use" in text
        assert "instance_conflict" in text
        # Several refused beats later: still refused, still not ready.
        seen = await _conflicts(m)
        await _until(lambda: _more_conflicts(m, seen + 2), "more refused heartbeats")
        assert (await _readyz(second))[0] == 503
        row = _proxy_row(m)
        assert row["instance"] == _instance_id(state1)
        assert row["refused_instance"] == _instance_id(state2)
        assert row["endpoint"] == f"ws://127.0.0.1:{first.port}"  # never flipped
        log = second.log_text()
        assert f"proxy key {key_id} is in use by another running cpvm instance" in log
        assert key.split(".", 1)[1] not in log

        # A token redeemed through the second: refused with 4008, and not used up.
        answer = await m.endpoint(alice, vm)
        token = answer["websocket"]["token"]
        stray = await open_console(f"ws://127.0.0.1:{second.port}/websockify?token={token}")
        try:
            await stray.rfb_handshake()
        except RfbRefused as e:
            assert "console proxy identity conflict" in str(e)
        closed = await stray.wait_closed()
        assert closed.code == 4008
        other, _ = await _console(first, token)
        other.sendClose(1000)
        await other.wait_closed()

        # The first's console was untouched throughout: it still relays, it is still live.
        assert await full_update(console, info) > 0
        live = {s["id"]: s for s in await _live_sessions(m, alice)}
        assert session_id in live and "endreason" not in live[session_id]

        # The first stops: the second takes over once the first is silent for proxy_timeout.
        await proxies.stop(first)
        await _until(lambda: _ready(second), "the second takes over", timeout=PROXY_TIMEOUT * 6)
        assert _proxy_row(m)["instance"] == _instance_id(state2)
        answer = await m.endpoint(alice, vm)
        assert answer["websocket"]["port"] == str(second.port)
        console2, info2 = await _console(second, answer["websocket"]["token"])
        assert await full_update(console2, info2) > 0
        console2.sendClose(1000)
        await console2.wait_closed()

        # A crash (SIGKILL) and a new process on the same state directory: the same
        # instance, accepted on its first heartbeat, not after proxy_timeout.
        refused_before = await _conflicts(m)
        second._process.stop_signal = signal.SIGKILL
        await proxies.stop(second)
        again = await proxies.start(state2)
        await _until(lambda: _ready(again), "the restarted instance is ready")
        assert await _conflicts(m) == refused_before  # not one refusal on the way
        assert _proxy_row(m)["instance"] == _instance_id(state2)
        # And a clean restart (SIGTERM) likewise.
        await proxies.stop(again)
        third = await proxies.start(state2)
        await _until(lambda: _ready(third), "the instance restarted cleanly is ready")
        assert await _conflicts(m) == refused_before
        # No token, VNC password or key secret in any line any of them wrote.
        for daemon in proxies.started:
            text = daemon.log_text()
            assert not [x[:4] for x in m.secrets_seen if x in text], daemon.log_path
    finally:
        if proxies is not None:
            for daemon in proxies.started:
                await proxies.stop(daemon)
                # Shown when the test fails (without the readiness polls).
                print(
                    "\n".join(
                        line for line in daemon.log_text().splitlines() if "GET /readyz" not in line
                    )[-4000:]
                )
        await m.stop()


async def _live_sessions(m, creds) -> list[dict]:
    status, body = await m.api(creds, "listConsoleSessions", activeonly="true")
    assert status == 200, body
    return body["listconsolesessionsresponse"].get("consolesession", [])


async def _ready(cpvm: Daemon) -> bool:
    return (await _readyz(cpvm))[0] == 200


async def _not_ready_conflict(cpvm: Daemon):
    status, text = await _readyz(cpvm)
    return (status, text) if "instance_conflict" in text else None


async def _more_conflicts(m, at_least: float) -> bool:
    return await _conflicts(m) >= at_least


async def _heartbeats_ok(m) -> float:
    r = await treq.get(m.base + "/metrics", persistent=False)
    for line in (await r.text()).splitlines():
        if line.startswith('cpvm_manager_proxy_requests_total{endpoint="heartbeat",status="200"}'):
            return float(line.split()[-1])
    return 0.0


@pytest_twisted.ensureDeferred
async def test_workers_of_one_instance_share_its_id(tmp_path):
    """``workers = 2``: both processes heartbeat as the one instance, never a conflict."""
    m = await start_manager(
        tmp_path / "manager",
        {"proxies": {"proxy_timeout": str(PROXY_TIMEOUT), "heartbeat_interval": "1"}},
    )
    key = m.proxy_key("multi")
    key_file = tmp_path / "proxy.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    state = tmp_path / "state"
    text = cpvm_config(
        m.base,
        credential_file=key_file,
        server={"state_directory": state, "port": free_port(), "workers": 2},
    )
    workdir = tmp_path / "cpvm"
    workdir.mkdir()
    daemon = await threads.deferToThread(start_cpvm, text, workdir=workdir)
    try:
        await _until(lambda: _ready(daemon), "cpvm with two workers is ready")
        # Both processes beat once a second: a dozen accepted beats cover both many times.
        await _until(lambda: _at_least(_heartbeats_ok(m), 12), "a dozen heartbeats")
        assert await _conflicts(m) == 0
        assert _proxy_row(m)["instance"] == _instance_id(state)
        assert _proxy_row(m)["refused_instance"] is None
        assert [p.name for p in state.iterdir()] == ["instance-id"]
    finally:
        await threads.deferToThread(daemon.stop)
        await m.stop()


async def _at_least(value, minimum: float) -> bool:
    return await value >= minimum


def test_unusable_state_directory_stops_start_up(tmp_path):
    """No instance id, no start: the error names the file, section and key."""
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file, not a directory\n")
    text = cpvm_config("http://127.0.0.1:9", server={"state_directory": not_a_dir})
    workdir = tmp_path / "cpvm"
    workdir.mkdir()
    with pytest.raises(PeerStartError) as e:
        start_cpvm(text, workdir=workdir, timeout=20)
    assert "[server] state_directory: cannot keep the instance id there" in str(e.value)
