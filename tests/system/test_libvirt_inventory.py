"""libvirt discovery against a real libvirtd (tests/libvirt_host.py: a private session
daemon with the QEMU driver), the real manager (in the test's reactor, its HTTP listener and
SQLite) and a real cpvm (``twistd cpvm``): domains become VMs, their state and VNC port
follow libvirt, and a console reaches the libvirt-started guest through cpvm.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

from tests.daemons import cpvm_config, start_cpvm
from tests.libvirt_host import domain_xml, readable_guest, restart_libvirtd, start_libvirtd
from tests.manager.harness import start_manager
from tests.manager.test_proxy_keys import proxies
from tests.peers import GUEST_READY_MARKER, free_port
from tests.system.test_whole_system import _type_in_browser
from tests.wsclient import RfbRefused, open_console

WEB_PASSWORD = "lvpw-1"


async def _blocking(fn, *args):
    return await threads.deferToThread(fn, *args)


async def until(check, what: str, timeout: float = 30.0):
    """Poll ``check()`` (a coroutine function) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.2)


@pytest_twisted.async_yield_fixture
async def lab(tmp_path, demo_guest):
    """libvirtd with two domains (web: the demo guest, VNC password; db: no disk, no
    password), a manager discovering them for alice, and a cpvm."""
    host = await _blocking(start_libvirtd)
    m = cpvm = None
    try:
        guest = readable_guest(host, demo_guest)
        serial = host.file("web-serial.log")
        conn = await _blocking(host.connect)
        web = await _blocking(
            conn.defineXML, domain_xml("web", password=WEB_PASSWORD, guest=guest, serial_log=serial)
        )
        db = await _blocking(conn.defineXML, domain_xml("db"))
        await _blocking(web.create)
        await _blocking(db.create)
        m = await start_manager(
            tmp_path / "manager",
            {
                "inventory.libvirt.lab": {
                    "uri": host.uri,
                    "owner": "alice",
                    "sync_interval": 2,
                    "timeout": 5,
                }
            },
        )
        m.secrets_seen.append(WEB_PASSWORD)
        alice, bob = m.account("alice"), m.account("bob")
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        m.secrets_seen.append(key_file.read_text().strip())
        cpvm = await _blocking(
            lambda: start_cpvm(
                cpvm_config(m.base, credential_file=key_file, server={"port": free_port()}),
                workdir=tmp_path,
            )
        )

        async def proxy_up():
            return proxies(m)["cpvm1"]["status"] == "up"

        await until(proxy_up, "cpvm's first heartbeat")
        yield {
            "host": host,
            "conn": conn,
            "m": m,
            "alice": alice,
            "bob": bob,
            "web": web,
            "db": db,
            "serial": serial,
            "guest": guest,
        }
        await _blocking(conn.close)
    finally:
        if cpvm is not None:
            await _blocking(cpvm.stop)
            leaked = [s[:6] for s in m.secrets_seen if s in cpvm.log_text()]
            assert not leaked, leaked
        if m is not None:
            await m.stop()
        await _blocking(host.stop)


async def listed(m, creds, **filters) -> dict[str, dict]:
    status, body = await m.api(creds, "listVirtualMachines", **filters)
    assert status == 200, body
    return {v["name"]: v for v in body["listvirtualmachinesresponse"]["virtualmachine"]}


def registry(m) -> dict[str, dict]:
    return {v["name"]: v for v in json.loads(m.admin("--json", "vm", "list"))}


async def console_frame(m, creds, vm_id: str, expected_name: bytes) -> None:
    """createConsoleEndpoint, then RFB through cpvm to the guest's VNC server, up to a
    FramebufferUpdate."""
    answer = await m.endpoint(creds, vm_id)
    assert answer["success"], answer
    ws = answer["websocket"]
    client = await open_console(f"ws://{ws['host']}:{ws['port']}/websockify?token={ws['token']}")
    info = await client.rfb_handshake()
    assert info["name"] == expected_name
    client.send(struct.pack("!BBHHHH", 3, 0, 0, 0, info["width"], info["height"]))
    assert (await client.read(4))[0] == 0
    return client


async def type_text(client, text: str) -> None:
    for ch in text:
        keysym = 0xFF0D if ch == "\n" else ord(ch)
        client.send(struct.pack("!BBxxI", 4, 1, keysym))
        client.send(struct.pack("!BBxxI", 4, 0, keysym))
        await deferLater(reactor, 0.03)


@pytest_twisted.ensureDeferred
async def test_domains_become_vms_and_follow_libvirt(lab):
    m, alice, bob, conn = lab["m"], lab["alice"], lab["bob"], lab["conn"]
    web_id, db_id = lab["web"].UUIDString(), lab["db"].UUIDString()

    async def both_running():
        vms = await listed(m, alice)
        return (
            vms
            if {n: v["state"] for n, v in vms.items()} == {"db": "Running", "web": "Running"}
            else None
        )

    vms = await until(both_running, "both domains discovered and Running")
    assert (vms["web"]["id"], vms["db"]["id"]) == (web_id, db_id)  # the domain's UUID
    assert vms["web"]["hypervisor"] == "KVM" and vms["web"]["account"] == "alice"
    assert vms["web"]["hostname"]  # the libvirt host's name
    assert await listed(m, bob) == {}  # owner only
    rows = registry(m)
    assert rows["web"]["password"] == "yes" and rows["db"]["password"] == "no"
    assert rows["web"]["source"] == "libvirt:lab"
    assert rows["web"]["vnc"].startswith("127.0.0.1:")

    # A console through cpvm to the libvirt-started guest; keys reach it.
    deadline = time.monotonic() + 60
    while GUEST_READY_MARKER not in (
        lab["serial"].read_text(errors="replace") if lab["serial"].exists() else ""
    ):
        assert time.monotonic() < deadline, "the guest's shell never started"
        await deferLater(reactor, 0.5)
    client = await console_frame(m, alice, web_id, b"web")
    await type_text(client, "serial typed42\n")

    async def typed():
        return "typed42" in lab["serial"].read_text(errors="replace")

    await until(typed, "keys typed through cpvm reaching the guest's serial port")
    client.sendClose(1000)
    await client.wait_closed()
    # And as a person does it: noVNC in Chromium, typing into the libvirt guest.
    url = (await m.endpoint(alice, web_id))["url"]
    status, second = await threads.deferToThread(
        _type_in_browser, url, "serial novnc42", lab["host"].file("web.png")
    )
    assert status == "Connected (unencrypted) to web"
    assert second == "New connection has been rejected with reason: token already used"

    async def typed_in_browser():
        return "novnc42" in lab["serial"].read_text(errors="replace")

    await until(typed_in_browser, "keys typed in noVNC reaching the guest")
    # db has no password: the console works the same.
    client = await console_frame(m, alice, db_id, b"db")
    client.sendClose(1000)
    await client.wait_closed()

    # Stopped in libvirt: Stopped here within seconds, and no console.
    await _blocking(lab["db"].destroy)

    async def db_stopped():
        return (await listed(m, alice, id=db_id)).get("db", {}).get("state") == "Stopped"

    await until(db_stopped, "db Stopped", timeout=10)
    answer = await m.endpoint(alice, db_id)
    assert not answer["success"] and "not running" in answer["details"]

    # Started again on another port: the new port is used.
    old_port = int(registry(m)["db"]["vnc"].rsplit(":", 1)[1])
    new_port = free_port()
    while new_port < 5900 or new_port == old_port:
        new_port = free_port()
    db = await _blocking(conn.defineXML, domain_xml("db", port=new_port, uuid=db_id))
    await _blocking(db.create)

    async def db_on_new_port():
        row = registry(m)["db"]
        return row["state"] == "Running" and row["vnc"] == f"127.0.0.1:{new_port}"

    await until(db_on_new_port, "db Running on its new port", timeout=10)
    client = await console_frame(m, alice, db_id, b"db")
    client.sendClose(1000)
    await client.wait_closed()

    # Undefined: gone.
    await _blocking(db.destroy)
    await _blocking(db.undefine)

    async def db_gone():
        return "db" not in await listed(m, alice)

    await until(db_gone, "db removed from the registry", timeout=10)
    assert "db" not in registry(m)


@pytest_twisted.ensureDeferred
async def test_vms_added_by_hand_or_api_are_never_touched(lab):
    m, alice, conn = lab["m"], lab["alice"], lab["conn"]
    root = m.account("root", is_admin=True)
    manual = m.vm("alice", name="by-hand", state="Stopped")
    status, body = await m.api(
        root,
        "addConsoleVirtualMachine",
        method="POST",
        name="by-api",
        account="alice",
        vnchost="192.0.2.9",
        vncport="5999",
    )
    assert status == 200, body
    # A domain whose UUID is the hand-made VM's: discovery leaves that VM alone.
    twin = await _blocking(conn.defineXML, domain_xml("twin", uuid=manual))
    await _blocking(twin.create)

    async def synced():
        return {"web", "db"} <= set(await listed(m, alice))

    await until(synced, "discovery")
    await _blocking(twin.destroy)
    await _blocking(twin.undefine)
    watcher = [s for s in m.service if hasattr(s, "watchers")][0].watchers[0]
    before = watcher.syncs

    async def two_more_syncs():
        return watcher.syncs >= before + 2

    await until(two_more_syncs, "two more syncs")
    rows = registry(m)
    assert (rows["by-hand"]["id"], rows["by-hand"]["state"], rows["by-hand"]["source"]) == (
        manual,
        "Stopped",
        "manual",
    )
    assert (rows["by-api"]["vnc"], rows["by-api"]["source"]) == ("192.0.2.9:5999", "api")
    assert "twin" not in rows
    # And a discovered VM cannot be changed by hand: libvirt is where it lives.
    web_id = lab["web"].UUIDString()
    status, body = await m.api(
        root, "updateConsoleVirtualMachine", method="POST", id=web_id, vncport="1234"
    )
    assert (
        status == 431
        and "change it in libvirt" in body["updateconsolevirtualmachineresponse"]["errortext"]
    )


@pytest_twisted.ensureDeferred
async def test_a_host_that_is_down_makes_its_vms_unknown_and_is_retried(lab):
    m, alice = lab["m"], lab["alice"]

    async def running():
        vms = await listed(m, alice)
        return vms if vms and all(v["state"] == "Running" for v in vms.values()) else None

    await until(running, "discovery")
    await _blocking(lab["host"].stop_daemon)  # the guests go on; libvirt is gone

    async def unknown():
        vms = await listed(m, alice)  # the API answers meanwhile
        return vms if vms and all(v["state"] == "Unknown" for v in vms.values()) else None

    vms = await until(unknown, "VMs Unknown", timeout=15)
    answer = await m.endpoint(alice, vms["web"]["id"])
    assert not answer["success"] and "Unknown" in answer["details"]
    await _blocking(restart_libvirtd, lab["host"])
    await until(running, "VMs Running again after libvirtd came back", timeout=20)


@pytest.fixture
def unreachable_uri(tmp_path):
    return f"qemu+unix:///session?socket={tmp_path / 'no-such-socket'}"


@pytest_twisted.ensureDeferred
async def test_a_host_never_reached_blocks_nothing(tmp_path, unreachable_uri):
    m = await start_manager(
        tmp_path / "m",
        {"inventory.libvirt.gone": {"uri": unreachable_uri, "owner": "alice", "sync_interval": 1}},
    )
    try:
        alice = m.account("alice")
        watcher = [s for s in m.service if hasattr(s, "watchers")][0].watchers[0]
        before = watcher.syncs

        async def retried():
            return watcher.syncs >= before + 2

        await until(retried, "two failed syncs (retries)")
        status, body = await m.api(alice, "listVirtualMachines")
        assert (status, body["listvirtualmachinesresponse"]["count"]) == (200, 0)
        assert uuid.UUID(m.vm("alice"))  # the registry still takes VMs by hand
    finally:
        await m.stop()


@pytest_twisted.ensureDeferred
async def test_a_host_that_hangs_never_blocks_the_api(lab):
    """libvirtd frozen (SIGSTOP): calls to it hang; after the source's timeout (5 s here)
    its VMs are Unknown, the API answers all along, and thawed it is used again."""
    m, alice, host = lab["m"], lab["alice"], lab["host"]

    async def running():
        vms = await listed(m, alice)
        return vms if vms and all(v["state"] == "Running" for v in vms.values()) else None

    await until(running, "discovery")
    os.kill(host.process.pid, signal.SIGSTOP)
    try:

        async def unknown():
            started = time.monotonic()
            vms = await listed(m, alice)
            answers.append(time.monotonic() - started)
            return vms if vms and all(v["state"] == "Unknown" for v in vms.values()) else None

        answers: list[float] = []
        await until(unknown, "VMs Unknown while libvirtd hangs", timeout=20)
        # Every listVirtualMachines answered while the libvirt call hung (no timed
        # assertion: the poll's own bound is what proves nothing waited on libvirt).
        assert len(answers) >= 2
    finally:
        os.kill(host.process.pid, signal.SIGCONT)
    await until(running, "VMs Running again once libvirtd answers", timeout=20)


@pytest_twisted.ensureDeferred
async def test_an_orchestrator_adds_updates_removes_then_consoles(lab):
    """The admin API over the real manager, then a console through cpvm to the VNC server
    the VM names (here the libvirt guest's, by address, as an orchestrator would)."""
    m, alice = lab["m"], lab["alice"]
    root = m.account("root", is_admin=True)

    async def web_running():
        return registry(m).get("web", {}).get("state") == "Running"

    await until(web_running, "discovery")
    host, port = registry(m)["web"]["vnc"].rsplit(":", 1)
    status, body = await m.api(
        root,
        "addConsoleVirtualMachine",
        method="POST",
        name="orchestrated",
        account="alice",
        vnchost=host,
        vncport=port,
        vncpassword="wrong-pw",
    )
    assert status == 200, body
    vm_id = body["addconsolevirtualmachineresponse"]["virtualmachine"]["id"]
    m.secrets_seen.append("wrong-pw")
    answer = await m.endpoint(alice, vm_id)
    ws = answer["websocket"]
    client = await open_console(f"ws://{ws['host']}:{ws['port']}/websockify?token={ws['token']}")
    with pytest.raises(RfbRefused, match="VNC authentication failed"):
        await client.rfb_handshake()  # QEMU refuses the wrong password
    assert (await client.wait_closed()).code == 4012
    status, body = await m.api(
        root, "updateConsoleVirtualMachine", method="POST", id=vm_id, vncpassword=WEB_PASSWORD
    )
    assert status == 200, body
    client = await console_frame(m, alice, vm_id, b"orchestrated")  # cpvm names the VM
    client.sendClose(1000)
    await client.wait_closed()
    status, _ = await m.api(root, "removeConsoleVirtualMachine", id=vm_id)
    assert status == 200
    status, body = await m.api(alice, "createConsoleEndpoint", virtualmachineid=vm_id)
    answer = body["createconsoleendpointresponse"]["consoleendpoint"]
    assert not answer["success"]


@pytest_twisted.ensureDeferred
async def test_two_managers_on_one_postgres_do_not_fight(tmp_path, postgres):
    """Both managers sync the same host into one database: each change is made once (an
    advisory lock per source, and a sync writes only what differs)."""
    from twisted.logger import globalLogPublisher

    from tests.manager.test_postgres import _pg_sections

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    host = await _blocking(start_libvirtd)
    managers = []
    try:
        conn = await _blocking(host.connect)
        doms = [await _blocking(conn.defineXML, domain_xml(n)) for n in ("one", "two")]
        for dom in doms:
            await _blocking(dom.create)
        _, sections = _pg_sections(postgres, tmp_path / "kek")
        sections["inventory.libvirt.lab"] = {"uri": host.uri, "owner": "alice", "sync_interval": 1}
        first = await start_manager(tmp_path / "a", sections)
        managers.append(first)
        first.admin("account", "create", "alice")
        managers.append(await start_manager(tmp_path / "b", sections))
        watchers = [
            [s for s in m.service if hasattr(s, "watchers")][0].watchers[0] for m in managers
        ]

        async def both_synced(after=(0, 0)):
            return all(w.syncs >= a + 2 for w, a in zip(watchers, after, strict=False))

        await until(both_synced, "syncs by both managers")
        await _blocking(doms[0].destroy)

        async def one_stopped():
            return registry(first)["one"]["state"] == "Stopped"

        await until(one_stopped, "one Stopped")
        after = tuple(w.syncs for w in watchers)

        async def more():
            return await both_synced(after)

        await until(more, "more syncs by both")
        audit = [
            (e["event"], e["vm_name"]) for e in events if str(e.get("event", "")).startswith("vm_")
        ]
        assert sorted(audit) == [("vm_added", "one"), ("vm_added", "two"), ("vm_updated", "one")], (
            audit
        )
        rows = json.loads(first.admin("--json", "vm", "list"))
        assert sorted(r["name"] for r in rows) == ["one", "two"]
        assert not [e for e in events if e.get("log_failure") is not None]
    finally:
        globalLogPublisher.removeObserver(events.append)
        for m in managers:
            await m.stop()
        await _blocking(host.stop)


@pytest_twisted.ensureDeferred
async def test_vnc_tls_x509_as_libvirt_sets_it_up(tmp_path, pki):
    """qemu.conf vnc_tls = 1 on the host; vnc_tls = x509 with the CA in the source: cpvm
    speaks VeNCrypt X509 to the guest's VNC and verifies its certificate."""
    host = await _blocking(
        lambda: start_libvirtd(
            qemu_conf='vnc_tls = 1\nvnc_tls_x509_cert_dir = "{tls}"\nvnc_tls_x509_verify = 0\n',
            tls_dir=pki.dir,
        )
    )
    m = cpvm = None
    try:
        conn = await _blocking(host.connect)
        dom = await _blocking(conn.defineXML, domain_xml("secure", password="tls-pw-1"))
        await _blocking(dom.create)
        m = await start_manager(
            tmp_path / "manager",
            {
                "inventory.libvirt.tls": {
                    "uri": host.uri,
                    "owner": "alice",
                    "vnc_tls": "x509",
                    "vnc_ca_file": str(pki.ca_cert),
                }
            },
        )
        m.secrets_seen.append("tls-pw-1")
        alice = m.account("alice")
        key_file = tmp_path / "proxy.key"
        m.admin("proxy-key", "create", "--name", "cpvm1", "--output", str(key_file))
        cpvm = await _blocking(
            lambda: start_cpvm(
                cpvm_config(m.base, credential_file=key_file, server={"port": free_port()}),
                workdir=tmp_path,
            )
        )

        async def ready():
            return (
                proxies(m)["cpvm1"]["status"] == "up"
                and registry(m).get("secure", {}).get("state") == "Running"
            )

        await until(ready, "cpvm up and the domain discovered")
        assert registry(m)["secure"]["tls"] == "x509"
        client = await console_frame(m, alice, dom.UUIDString(), b"secure")
        client.sendClose(1000)
        await client.wait_closed()
        await _blocking(dom.destroy)
        await _blocking(conn.close)
    finally:
        if cpvm is not None:
            await _blocking(cpvm.stop)
        if m is not None:
            await m.stop()
        await _blocking(host.stop)
