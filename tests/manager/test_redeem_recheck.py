"""A redemption re-checks the token's account: still enabled, still allowed the VM."""

from __future__ import annotations

import pytest_twisted


async def _setup(m):
    alice = m.account("alice")
    m.account("bob")
    vm = m.vm("alice")
    key = m.proxy_key("p1")
    await m.heartbeat(key)
    return alice, vm, key


@pytest_twisted.ensureDeferred
async def test_disabled_account_cannot_redeem_its_pending_token(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    m.admin("account", "disable", "alice")
    status, body = await m.redeem(key, token)
    assert (status, body["error"]) == (403, "account_unavailable")
    assert "vnc" not in body and "vncsecret-1" not in repr(body)
    # The API key stops working too.
    status, _ = await m.api(alice, "createConsoleEndpoint", virtualmachineid=vm)
    assert status == 401
    m.admin("account", "enable", "alice")
    status, body = await m.redeem(key, token)  # a refusal does not burn the token
    assert status == 200 and body["vnc"]["password"] == "vncsecret-1"


@pytest_twisted.ensureDeferred
async def test_vm_moved_to_another_owner_is_refused(managers):
    m = await managers()
    alice, vm, key = await _setup(m)
    root = m.account("root", is_admin=True)
    token = (await m.endpoint(alice, vm))["websocket"]["token"]
    admin_token = (await m.endpoint(root, vm))["websocket"]["token"]
    m.admin("vm", "update", vm, "--owner", "bob")
    status, body = await m.redeem(key, token)
    assert (status, body["error"]) == (403, "account_unavailable")
    # An admin account may use every VM, whoever owns it now...
    status, _ = await m.redeem(key, admin_token)
    assert status == 200
    # ...unless it was disabled.
    admin_token = (await m.endpoint(root, vm))["websocket"]["token"]
    m.admin("account", "disable", "root")
    status, body = await m.redeem(key, admin_token)
    assert (status, body["error"]) == (403, "account_unavailable")


def test_every_redemption_error_is_known_to_cpvm():
    """The contract both ways: each error the manager can answer maps to a close code."""
    from cpvm.common.contract import REDEMPTION_ERRORS, Outcome
    from cpvm.manager.proxy_broker import REDEEM_MESSAGE, REDEEM_STATUS

    assert set(REDEEM_MESSAGE) == set(REDEEM_STATUS) - {None}
    for error in REDEEM_MESSAGE:
        assert REDEMPTION_ERRORS[error].report == error
    assert REDEMPTION_ERRORS["account_unavailable"] is Outcome.ACCOUNT_UNAVAILABLE
    assert Outcome.ACCOUNT_UNAVAILABLE.code == 4009
    assert REDEEM_STATUS["account_unavailable"] == 403
