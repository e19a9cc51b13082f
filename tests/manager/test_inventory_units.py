"""The pure parts of libvirt discovery: domain XML, the config sections, one sync's
transaction on a real SQLite database."""

from __future__ import annotations

import time
from dataclasses import fields

import pytest

from cpvm.common.inifile import ConfigError, IniReader
from cpvm.manager import db, store, vm_store
from cpvm.manager.config import DatabaseConfig, parse_config
from cpvm.manager.inventory_sync import lock_key, mark_unknown, sync_source
from cpvm.manager.libvirt_domains import Domain, Vnc, domain_from, parse_vnc, vnc_host
from cpvm.manager.secrets_box import SecretBox

RUNNING, SHUTOFF, PAUSED = 1, 5, 3


def test_vnc_from_the_secure_xml():
    xml = (
        "<domain><devices><graphics type='spice' port='5930'/>"
        "<graphics type='vnc' port='5901' autoport='yes' listen='0.0.0.0' passwd='s3'>"
        "<listen type='address' address='192.0.2.4'/></graphics></devices></domain>"
    )
    assert parse_vnc(xml) == Vnc(5901, "192.0.2.4", "s3")
    # Off with autoport: no port yet; no passwd attribute without the secure flag.
    assert parse_vnc(
        "<domain><devices><graphics type='vnc' port='-1' autoport='yes'/></devices></domain>"
    ) == Vnc(None, None, None)
    # Nothing cpvm can reach: no graphics, SPICE only, a UNIX socket, listen type none.
    for devices in (
        "",
        "<graphics type='spice' port='5930'/>",
        "<graphics type='vnc' socket='/run/vnc.sock'/>",
        "<graphics type='vnc'><listen type='socket' socket='/x'/></graphics>",
        "<graphics type='vnc'><listen type='none'/></graphics>",
    ):
        assert parse_vnc(f"<domain><devices>{devices}</devices></domain>") is None, devices
    assert parse_vnc("not xml") is None


def test_states_and_hosts():
    xml = "<domain><devices><graphics type='vnc' port='5901'/></devices></domain>"
    assert domain_from("u", "n", RUNNING, xml).running
    assert domain_from("u", "n", PAUSED, xml).running  # QEMU still serves VNC
    assert not domain_from("u", "n", SHUTOFF, xml).running
    assert vnc_host("127.0.0.1", "10.0.0.1", "qemu:///system") == "127.0.0.1"
    assert vnc_host("0.0.0.0", "10.0.0.1", "qemu+ssh://h1/system") == "10.0.0.1"
    assert vnc_host("::", None, "qemu+ssh://root@h1.example/system") == "h1.example"
    assert vnc_host(None, None, "qemu:///system") == "127.0.0.1"


def _config(text: str):
    return parse_config(IniReader("manager.conf", text=text))


def test_inventory_sections_are_read_and_checked(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    config = _config(f"""
[inventory.libvirt.rack-1]
uri = qemu+tls://kvm1.example/system
owner = ops
vnc_address = 10.1.0.11
vnc_tls = x509
vnc_ca_file = {ca}
sync_interval = 10
[inventory.libvirt.local]
uri = qemu:///system
owner = ops
""")
    first, second = config.inventory
    assert (first.name, first.source, first.vnc_tls, first.sync_interval) == (
        "rack-1",
        "libvirt:rack-1",
        "x509",
        10.0,
    )
    assert first.vnc_ca_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert (second.vnc_address, second.sync_interval, second.timeout) == (None, 30.0, 30.0)
    assert _config("").inventory == ()


@pytest.mark.parametrize(
    "body, where, words",
    [
        (
            "uri = qemu:///system\nowner = a\nurl = x",
            "[inventory.libvirt.h] url",
            "unknown setting",
        ),
        ("owner = a", "[inventory.libvirt.h] uri", "required"),
        ("uri = http://h/\nowner = a", "[inventory.libvirt.h] uri", "qemu libvirt URI"),
        ("uri = qemu:///system", "[inventory.libvirt.h] owner", "required"),
        (
            "uri = qemu:///system\nowner = a\nvnc_address = 0.0.0.0",
            "[inventory.libvirt.h] vnc_address",
            "not 0.0.0.0",
        ),
        (
            "uri = qemu:///system\nowner = a\nvnc_tls = x509",
            "[inventory.libvirt.h] vnc_ca_file",
            "required with vnc_tls = x509",
        ),
        (
            "uri = qemu:///system\nowner = a\nsync_interval = 0",
            "[inventory.libvirt.h] sync_interval",
            "at least 1",
        ),
    ],
)
def test_bad_inventory_settings_name_file_section_key(body, where, words):
    with pytest.raises(ConfigError) as caught:
        _config(f"[inventory.libvirt.h]\n{body}\n")
    assert f"manager.conf: {where}:" in str(caught.value) and words in str(caught.value)


def test_unknown_inventory_sections_are_refused():
    for section in ("inventory.vmware.x", "inventory", "inventory.libvirt.bad name"):
        with pytest.raises(ConfigError):
            _config(f"[{section}]\nuri = qemu:///system\nowner = a\n")


@pytest.fixture
def tx_runner(tmp_path):
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    db.migrate(config, time.time())
    conn = db.connect_sync(config)
    yield lambda fn, *args: db.run_sync(conn, "sqlite", fn, *args)
    conn.close()


def _source(**overrides):
    text = "[inventory.libvirt.lab]\nuri = qemu+ssh://kvm1/system\nowner = alice\n"
    text += "".join(f"{k} = {v}\n" for k, v in overrides.items())
    return _config(text).inventory[0]


def _domain(uuid, name, running=True, port=5901, listen="0.0.0.0", password=None):
    return Domain(uuid, name, running, Vnc(port if running else None, listen, password))


U1, U2, U3 = (
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "33333333-3333-4333-8333-333333333333",
)


def test_a_sync_is_idempotent_and_only_touches_its_own(tx_runner, tmp_path):
    box = SecretBox.from_file(tmp_path / "kek")  # created on first use
    cfg = _source(vnc_address="10.1.0.11")
    now = time.time()
    alice = tx_runner(store.create_account, "a-id", "alice", "user", now)
    tx_runner(
        vm_store.insert_vm,
        {
            "id": U3,
            "name": "by-hand",
            "owner_id": alice.id,
            "state": "Stopped",
            "vnc_host": "h",
            "vnc_port": 1,
            "vnc_tls": "none",
        },
        vm_store.MANUAL,
        now,
    )
    domains = [
        _domain(U1, "web", password="pw"),
        _domain(U2, "db", running=False),
        _domain(U3, "twin"),
    ]
    result = tx_runner(sync_source, cfg, box, "kvm1", domains, now)
    assert (sorted(result.added), result.skipped) == ([U1, U2], [U3])
    rows = {v.id: v for v in tx_runner(store.list_vms)}
    assert (rows[U1].state, rows[U1].vnc_host, rows[U1].vnc_port) == ("Running", "10.1.0.11", 5901)
    assert box.decrypt(rows[U1].vnc_password_enc) == "pw" and rows[U2].state == "Stopped"
    # Again, unchanged: nothing written (the password's ciphertext is kept).
    again = tx_runner(sync_source, cfg, box, "kvm1", domains, now + 1)
    assert (again.added, again.updated, again.removed) == ([], [], [])
    assert tx_runner(store.get_vm, U1).vnc_password_enc == rows[U1].vnc_password_enc
    # A new port after a restart; db undefined.
    moved = tx_runner(
        sync_source, cfg, box, "kvm1", [_domain(U1, "web", port=5907, password="pw")], now + 2
    )
    assert moved.updated == [(U1, ("vnc_port",))] and moved.removed == [U2]
    # Down: its VMs Unknown, the hand-made one untouched.
    assert tx_runner(mark_unknown, cfg.source, now + 3) == 1
    rows = {v.id: v for v in tx_runner(store.list_vms)}
    assert set(rows) == {U1, U3}
    assert (rows[U1].state, rows[U3].state, rows[U3].name) == ("Unknown", "Stopped", "by-hand")


def test_lock_keys_are_stable_and_signed_64_bit():
    assert lock_key("libvirt:a") == lock_key("libvirt:a") != lock_key("libvirt:b")
    assert -(2**63) <= lock_key("libvirt:a") < 2**63


VNC_COLUMNS = {
    "vnc_host",
    "vnc_port",
    "vnc_password_enc",
    "vnc_tls",
    "vnc_ca_pem",
    "vnc_server_name",
}


def test_one_table_says_who_writes_each_vm_column(tx_runner):
    # By hand: the VM's description and its viewer policy, never what discovery reports
    # about its host.
    assert set(vm_store.EDITABLE) == {"name", "owner_id", "state", "viewer_policy"} | VNC_COLUMNS
    # Discovery writes the description and the host's name and hypervisor, never the
    # viewer policy; it compares all but the hypervisor, and reads back what it compares.
    described = set(vm_store.EDITABLE) - {"viewer_policy"}
    assert set(vm_store.DISCOVERED) == described | {"hostname", "hypervisor"}
    assert set(vm_store.COMPARED) == set(vm_store.DISCOVERED) - {"hypervisor"}
    assert tuple(f.name for f in fields(vm_store.OwnedVm)) == ("id", *vm_store.COMPARED)
    # The store's update refuses the columns it may not write, before any SQL.
    now = time.time()
    alice = tx_runner(store.create_account, "a-id", "alice", "user", now)
    vm = {"id": U1, "name": "v", "owner_id": alice.id, "state": "Stopped"}
    vm |= {"vnc_host": "h", "vnc_port": 1, "vnc_tls": "none"}
    tx_runner(store.add_vm, vm, now)
    for column in ("hostname", "hypervisor", "source"):
        with pytest.raises(ValueError, match=column):
            tx_runner(store.update_vm, U1, {column: "x"}, now)
    for column in ("source", "viewer_policy"):
        with pytest.raises(ValueError, match=column):
            tx_runner(vm_store.update_owned, U1, vm_store.MANUAL, {column: "x"}, now)
    tx_runner(vm_store.update_owned, U1, vm_store.MANUAL, {"hypervisor": "KVM"}, now)
    assert tx_runner(vm_store.owned_vms, vm_store.MANUAL)[U1].name == "v"
