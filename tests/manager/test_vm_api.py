"""listVirtualMachines and the admin VM commands over the real manager's signed API."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from cpvm.manager import vms
from tests.signing import signed_query

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def _vms(body):
    return body["listvirtualmachinesresponse"]


async def _add(m, admin, **params):
    """addConsoleVirtualMachine over POST, as an orchestrator sends it."""
    return await m.api(admin, "addConsoleVirtualMachine", method="POST", **params)


@pytest_twisted.ensureDeferred
async def test_list_shows_a_user_only_their_vms_in_cloudstack_names(managers):
    m = await managers()
    alice, bob = m.account("alice"), m.account("bob")
    root = m.account("root", is_admin=True)
    a1 = m.vm("alice", name="alpha-web")
    m.vm("alice", name="alpha-db", state="Stopped")
    b1 = m.vm("bob", name="bravo")
    status, body = await m.api(alice, "listVirtualMachines")
    assert status == 200, body
    listed = _vms(body)
    assert listed["count"] == 2
    assert [v["name"] for v in listed["virtualmachine"]] == ["alpha-db", "alpha-web"]
    web = listed["virtualmachine"][1]
    assert web["id"] == a1 and web["displayname"] == "alpha-web"
    assert web["state"] == "Running" and web["account"] == "alice"
    assert web["created"].endswith("+0000")
    # Never where the VNC server is nor its password; no cpvm internals for users.
    text = json.dumps(body)
    assert "10.0.0.5" not in text and "5901" not in text and "vncsecret" not in text
    assert "source" not in web and "viewerpolicy" not in web
    # Bob cannot see Alice's VM, by id, by name or by naming her account.
    status, body = await m.api(bob, "listVirtualMachines", id=a1)
    assert (status, _vms(body)["count"]) == (200, 0)
    status, body = await m.api(bob, "listVirtualMachines", account="alice")
    assert status == 431
    status, body = await m.api(bob, "listVirtualMachines", account="nosuch")
    assert status == 431  # the same answer: no hint that alice exists
    # An admin sees everyone's, may filter by account, and sees the source.
    status, body = await m.api(root, "listVirtualMachines")
    assert _vms(body)["count"] == 3
    status, body = await m.api(root, "listVirtualMachines", account="bob")
    assert [(v["id"], v["source"]) for v in _vms(body)["virtualmachine"]] == [(b1, "manual")]
    # ... and the viewer policy, set through the API like any other field.
    status, _ = await m.api(
        root, "updateConsoleVirtualMachine", method="POST", id=b1, viewerpolicy="takeover"
    )
    assert status == 200
    status, body = await m.api(root, "listVirtualMachines", id=b1)
    assert _vms(body)["virtualmachine"][0]["viewerpolicy"] == "takeover"
    status, body = await m.api(
        root, "updateConsoleVirtualMachine", method="POST", id=b1, viewerpolicy="first"
    )
    assert status == 431 and "viewerpolicy" in json.dumps(body)


@pytest_twisted.ensureDeferred
async def test_list_filters_and_pages_like_cloudstack(managers):
    m = await managers()
    alice = m.account("alice")
    for i in range(5):
        m.vm("alice", name=f"web-{i}", state="Stopped" if i % 2 else "Running")
    m.vm("alice", name="db_1")
    status, body = await m.api(alice, "listVirtualMachines", keyword="WEB")
    assert _vms(body)["count"] == 5
    status, body = await m.api(alice, "listVirtualMachines", keyword="_")
    assert [v["name"] for v in _vms(body)["virtualmachine"]] == ["db_1"]  # no LIKE wildcard
    status, body = await m.api(alice, "listVirtualMachines", name="web-3")
    assert [v["name"] for v in _vms(body)["virtualmachine"]] == ["web-3"]
    status, body = await m.api(alice, "listVirtualMachines", state="stopped")
    assert [v["name"] for v in _vms(body)["virtualmachine"]] == ["web-1", "web-3"]
    status, body = await m.api(alice, "listVirtualMachines", page="2", pagesize="4")
    page = _vms(body)
    # count is every match, as CloudStack's; the page holds the rest.
    assert page["count"] == 6 and [v["name"] for v in page["virtualmachine"]] == ["web-3", "web-4"]
    for bad in ({"page": "0"}, {"pagesize": "501"}, {"page": "x"}, {"id": "not-a-uuid"}):
        status, body = await m.api(alice, "listVirtualMachines", **bad)
        assert status == 431, (bad, body)
        assert _vms(body)["errorcode"] == 431


@pytest_twisted.ensureDeferred
async def test_admin_adds_updates_removes_over_the_api_and_audits(managers, log_events):
    m = await managers()
    root = m.account("root", is_admin=True)
    alice = m.account("alice")
    m.secrets_seen.append("orch-pw-1")
    status, body = await _add(
        m,
        root,
        name="orch-1",
        account="alice",
        vnchost="192.0.2.7",
        vncport="5905",
        vncpassword="orch-pw-1",
    )
    assert status == 200, body
    vm_id = body["addconsolevirtualmachineresponse"]["virtualmachine"]["id"]
    listed = json.loads(m.admin("--json", "vm", "list"))
    assert [(v["id"], v["vnc"], v["password"], v["source"]) for v in listed] == [
        (vm_id, "192.0.2.7:5905", "yes", "api")
    ]
    status, body = await m.api(alice, "listVirtualMachines")
    assert [v["id"] for v in _vms(body)["virtualmachine"]] == [vm_id]
    # A given id is kept; a second VM with it is refused.
    fixed = "6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f"
    status, _ = await _add(
        m, root, id=fixed, name="orch-2", account="alice", vnchost="host.example", vncport="5906"
    )
    assert status == 200
    status, body = await _add(
        m, root, id=fixed, name="orch-3", account="alice", vnchost="host.example", vncport="5906"
    )
    assert (
        status == 431 and "already exists" in body["addconsolevirtualmachineresponse"]["errortext"]
    )
    status, body = await m.api(
        root,
        "updateConsoleVirtualMachine",
        method="POST",
        id=vm_id,
        state="Stopped",
        vncport="5907",
        vncpassword="",
    )
    assert status == 200, body
    (row,) = [v for v in json.loads(m.admin("--json", "vm", "list")) if v["id"] == vm_id]
    assert (row["state"], row["vnc"], row["password"]) == ("Stopped", "192.0.2.7:5907", "no")
    status, body = await m.api(root, "removeConsoleVirtualMachine", id=vm_id)
    assert (status, body) == (200, {"removeconsolevirtualmachineresponse": {"success": True}})
    status, body = await m.api(root, "removeConsoleVirtualMachine", id=vm_id)
    assert status == 431 and "no VM" in body["removeconsolevirtualmachineresponse"]["errortext"]
    audit = [
        e
        for e in log_events
        if e.get("log_namespace") == "cpvm.audit" and str(e.get("event", "")).startswith("vm_")
    ]
    assert [(e["event"], e["by"], e["vm"]) for e in audit] == [
        ("vm_added", "root", vm_id),
        ("vm_added", "root", fixed),
        ("vm_updated", "root", vm_id),
        ("vm_removed", "root", vm_id),
    ]
    assert "vnc_password" in audit[0]["changed"] and "vnc_port" in audit[2]["changed"]
    assert not any("orch-pw-1" in repr(e) for e in log_events)


@pytest_twisted.ensureDeferred
async def test_same_rules_and_errors_as_the_cli(managers):
    m = await managers()
    root = m.account("root", is_admin=True)
    m.account("alice")
    cases = [
        ({"vncport": "70000"}, "vncport must be an integer from 1 to 65535"),
        ({"vnchost": "http://x/"}, "vnchost must be a host name or IP address"),
        ({"vnctls": "sometimes"}, "vnctls must be one of none, x509, anonymous"),
        ({"account": "nosuch"}, "no account 'nosuch'"),
        ({"vnccacertificate": "not a pem", "vnctls": "x509"}, "holds no PEM certificate"),
        ({"vnccacertificate": CA_PEM}, "vnccacertificate applies only with vnctls=x509"),
        ({"state": "Paused"}, "state must be one of Running, Stopped"),
    ]
    base = {"name": "x", "account": "alice", "vnchost": "192.0.2.1", "vncport": "5900"}
    for change, text in cases:
        status, body = await _add(m, root, **{**base, **change})
        assert status == 431, change
        assert text in body["addconsolevirtualmachineresponse"]["errortext"], (change, body)
    status, body = await _add(m, root, name="x", account="alice")
    assert (
        "missing parameter vnchost, vncport"
        in body["addconsolevirtualmachineresponse"]["errortext"]
    )
    # The CLI refuses the same values with the same words.
    with pytest.raises(vms.VmError, match="vncport must be an integer from 1 to 65535"):
        vms.parse_fields({"vnc_port": "70000"})
    out = m.directory / "cli.txt"
    import io

    from cpvm.manager import admin

    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        status = admin.main(
            [
                "--config",
                str(m.config_path),
                "vm",
                "add",
                "--name",
                "x",
                "--owner",
                "alice",
                "--vnc-host",
                "http://x/",
                "--vnc-port",
                "1",
            ],
            out=io.StringIO(),
        )
    assert status == 1 and "vnchost must be a host name or IP address" in err.getvalue()
    assert not out.exists()


@pytest_twisted.ensureDeferred
async def test_vnc_password_never_in_a_query_string(managers):
    m = await managers()
    root = m.account("root", is_admin=True)
    m.account("alice")
    status, body = await m.api(
        root,
        "addConsoleVirtualMachine",
        method="GET",
        name="x",
        account="alice",
        vnchost="192.0.2.1",
        vncport="5900",
        vncpassword="leaky",
    )
    assert status == 431
    assert "POST body" in body["addconsolevirtualmachineresponse"]["errortext"]
    assert json.loads(m.admin("--json", "vm", "list")) == []
    # Signed over the body but sent in the URL too: refused just the same.
    query = signed_query(
        {
            "command": "addConsoleVirtualMachine",
            "response": "json",
            "name": "x",
            "account": "alice",
            "vnchost": "192.0.2.1",
            "vncport": "5900",
            "vncpassword": "leaky",
        },
        root.api_key,
        root.secret,
        expires_at=m.clock.seconds() + 300,
    )
    from urllib.parse import urlencode

    import treq

    response = await treq.post(
        f"{m.base}/client/api?vncpassword=leaky",
        data=urlencode(query).encode(),
        persistent=False,
        headers={"Content-Type": ["application/x-www-form-urlencoded"]},
    )
    assert response.code == 431
    await response.text()


@pytest.mark.parametrize(
    "command",
    ["addConsoleVirtualMachine", "updateConsoleVirtualMachine", "removeConsoleVirtualMachine"],
)
@pytest_twisted.ensureDeferred
async def test_a_user_gets_cloudstacks_permission_error(managers, command):
    m = await managers()
    alice = m.account("alice")
    vm = m.vm("alice")
    status, body = await m.api(
        alice,
        command,
        method="POST",
        id=vm,
        name="mine",
        account="alice",
        vnchost="192.0.2.1",
        vncport="5900",
    )
    assert status == 432
    assert body == {
        f"{command.lower()}response": {
            "uuidList": [],
            "errorcode": 432,
            "cserrorcode": 9999,
            "errortext": f"The API [{command}] does not exist or is not available for the account "
            "alice.",
        }
    }
    (row,) = json.loads(m.admin("--json", "vm", "list"))
    assert (row["name"], row["vnc"]) == ("web-01", "10.0.0.5:5901")  # untouched


@pytest_twisted.ensureDeferred
async def test_the_cli_audits_vm_changes_to_the_audit_file(managers, tmp_path):
    audit_file = tmp_path / "audit.jsonl"
    m = await managers(sections={"log": {"audit_file": str(audit_file)}})
    m.account("alice")
    vm = m.vm("alice", password="cli-pw-9")
    m.admin("vm", "update", vm, "--state", "Stopped")
    m.admin("vm", "remove", vm)
    lines = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert [(x["event"], x["vm"]) for x in lines] == [
        ("vm_added", vm),
        ("vm_updated", vm),
        ("vm_removed", vm),
    ]
    assert "by cpvm-manager-admin" in lines[0]["message"]
    assert "vnc_password" in lines[0]["message"] and "cli-pw-9" not in audit_file.read_text()
