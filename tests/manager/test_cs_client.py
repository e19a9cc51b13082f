"""PyPI's ``cs`` (CloudStack's Python client, pinned in setup.cfg) against the real manager,
unchanged: it signs with signatureVersion=3 and ``expires`` (its ``expiration`` option,
600 s by default), pages list commands with fetch_list, and reports errors as
``CloudStackApiException``."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import pytest_twisted
from cs import CloudStack, CloudStackApiException
from twisted.internet import threads
from twisted.internet.task import Clock


def _client(m, creds, **options) -> CloudStack:
    return CloudStack(
        endpoint=f"{m.base}/client/api", key=creds.api_key, secret=creds.secret, **options
    )


@pytest_twisted.ensureDeferred
async def test_cs_lists_vms_and_opens_a_console_endpoint(managers, log_events):
    m = await managers()
    alice = m.account("alice")
    m.account("bob")
    ids = {m.vm("alice", name=f"vm-{i:02d}") for i in range(7)}
    m.vm("bob", name="not-yours")
    await m.heartbeat(m.proxy_key("p1"))
    cs = _client(m, alice)
    # fetch_list pages (pagesize 3 here) until count is reached.
    listed = await threads.deferToThread(
        lambda: cs.listVirtualMachines(fetch_list=True, pagesize=3)
    )
    assert {v["id"] for v in listed} == ids
    assert all(v["account"] == "alice" and v["state"] == "Running" for v in listed)
    one = await threads.deferToThread(lambda: cs.listVirtualMachines(keyword="vm-03"))
    assert [v["name"] for v in one["virtualmachine"]] == ["vm-03"]
    answer = await threads.deferToThread(
        lambda: cs.createConsoleEndpoint(virtualmachineid=listed[0]["id"])
    )
    endpoint = answer["consoleendpoint"]
    assert endpoint["success"] is True and endpoint["websocket"]["token"]
    m.secrets_seen.append(endpoint["websocket"]["token"])


@pytest_twisted.ensureDeferred
async def test_cs_signs_version_3_with_expires(managers):
    # The manager's clock an hour ahead: cs's default expiration (600 s) has passed.
    clock = Clock()
    clock.advance(time.time() + 3600)
    # An expiry two hours out is one hour ahead of the manager: allowed here.
    m = await managers(clock=clock, sections={"security": {"max_request_lifetime": "7200"}})
    alice = m.account("alice")
    with pytest.raises(CloudStackApiException) as caught:
        await threads.deferToThread(lambda: _client(m, alice).listVirtualMachines())
    assert caught.value.error["errortext"] == "request expired"
    later = _client(m, alice, expiration=timedelta(hours=2))
    answer = await threads.deferToThread(lambda: later.listVirtualMachines())
    assert answer == {"count": 0, "virtualmachine": []}


@pytest_twisted.ensureDeferred
async def test_cs_sees_cloudstacks_errors(managers):
    m = await managers()
    alice = m.account("alice")
    cs = _client(m, alice, method="post")
    with pytest.raises(CloudStackApiException) as caught:
        await threads.deferToThread(
            lambda: cs.removeConsoleVirtualMachine(id="6f1c2c46-1111-4a8e-9d55-0a1b2c3d4e5f")
        )
    assert caught.value.error["errorcode"] == 432
    assert "not available for the account alice" in caught.value.error["errortext"]
    wrong = CloudStack(endpoint=f"{m.base}/client/api", key=alice.api_key, secret="nope")
    with pytest.raises(CloudStackApiException) as caught:
        await threads.deferToThread(lambda: wrong.listVirtualMachines())
    assert caught.value.error["errorcode"] == 401


@pytest_twisted.ensureDeferred
async def test_an_orchestrator_adds_a_vm_with_cs_over_post(managers):
    m = await managers()
    root = m.account("root", is_admin=True)
    m.account("alice")
    cs = _client(m, root, method="post")
    added = await threads.deferToThread(
        lambda: cs.addConsoleVirtualMachine(
            name="orch", account="alice", vnchost="192.0.2.8", vncport=5900, vncpassword="cs-vnc-pw"
        )
    )
    vm_id = added["virtualmachine"]["id"]
    listed = await threads.deferToThread(lambda: cs.listVirtualMachines(id=vm_id))
    assert listed["virtualmachine"][0]["source"] == "api"
    await threads.deferToThread(lambda: cs.removeConsoleVirtualMachine(id=vm_id))
    listed = await threads.deferToThread(lambda: cs.listVirtualMachines())
    assert listed["count"] == 0
