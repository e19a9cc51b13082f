"""Recording from policy to playback with the real manager and a real cpvm process:
``vm add --record always``, the console through cpvm, the end report's summary stored by
the manager and equal to the file on the proxy, createConsoleRecordingPlayback's one-time
URL served by that proxy (431 for an account without the right), also after the proxy
restarted."""

from __future__ import annotations

import hashlib
import os
import time

import pytest_twisted
import treq
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.integration import scripted_vnc
from tests.manager.harness import start_manager
from tests.manager.test_proxy_keys import proxies
from tests.peers import free_port
from tests.wsclient import open_console


async def until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.2)
    return value


@pytest_twisted.ensureDeferred
async def test_policy_recording_summary_and_playback(tmp_path):
    m = await start_manager(tmp_path / "manager")
    echo_port, _factory, listening = scripted_vnc.listen(scripted_vnc.EchoRfb)
    cpvm = None
    try:
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        m.secrets_seen.append(key_file.read_text().strip())
        port = free_port()
        directory = tmp_path / "recordings"
        text = cpvm_config(
            m.base,
            credential_file=key_file,
            server={"port": port},
            recording={"directory": directory},
        )
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path)

        async def up():
            return proxies(m)["cpvm1"]["status"] == "up"

        await until(up, "cpvm's first heartbeat")
        admin = m.account("root", is_admin=True)
        alice = m.account("alice")
        vm = m.vm(
            "alice", password=None, vnc_host="127.0.0.1", vnc_port=str(echo_port), record="always"
        )
        ws = (await m.endpoint(alice, vm))["websocket"]
        client = await open_console(f"ws://127.0.0.1:{port}/websockify?token={ws['token']}")
        init = await client.rfb_handshake()
        assert init["name"] == "\u25cf REC web-01".encode()
        keys = b"".join(b"\x04\x01\x00\x00" + os.urandom(4) for _ in range(500))
        client.send(keys)
        assert await client.read(len(keys)) == keys
        client.sendClose(1000)
        await client.wait_closed()

        async def summary():
            status, body = await m.api(admin, "listConsoleSessions")
            session = body["listconsolesessionsresponse"]["consolesession"][0]
            rec = session.get("recording") or {}
            return (session["id"], rec) if rec.get("size") else None

        sid, rec = await until(summary, "the recording's summary in the manager")
        raw = (directory / f"{sid}.fbs").read_bytes()
        assert rec["size"] == len(raw) and rec["sha256"] == hashlib.sha256(raw).hexdigest()
        assert rec["complete"] is True

        status, refused = await m.api(alice, "createConsoleRecordingPlayback", id=sid)
        assert status == 431, refused
        status, answer = await m.api(admin, "createConsoleRecordingPlayback", id=sid)
        assert status == 200, answer
        url = answer["createconsolerecordingplaybackresponse"]["consolerecordingplayback"]["url"]
        page, ticket = url.split("#ticket=")
        assert page == f"http://127.0.0.1:{port}/recording/play"
        m.secrets_seen.append(ticket)
        data = f"http://127.0.0.1:{port}/recording/data?ticket={ticket}"
        first = await treq.get(data, persistent=False)
        assert first.code == 200
        assert hashlib.sha256(await first.content()).hexdigest() == rec["sha256"]
        again = await treq.get(data, persistent=False)
        assert again.code == 409 and b"already used" in await again.content()

        # The proxy's recordings survive its restart.
        await threads.deferToThread(cpvm.stop)
        (tmp_path / "restarted").mkdir()
        cpvm = await threads.deferToThread(start_cpvm, text, workdir=tmp_path / "restarted")
        status, answer = await m.api(admin, "createConsoleRecordingPlayback", id=sid)
        url = answer["createconsolerecordingplaybackresponse"]["consolerecordingplayback"]["url"]
        ticket = url.split("#ticket=")[1]
        m.secrets_seen.append(ticket)
        after = await treq.get(
            f"http://127.0.0.1:{port}/recording/data?ticket={ticket}", persistent=False
        )
        assert after.code == 200
        assert hashlib.sha256(await after.content()).hexdigest() == rec["sha256"]
    finally:
        await listening.stopListening()
        if cpvm is not None:
            await threads.deferToThread(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        await m.stop()
