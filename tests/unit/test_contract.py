"""Both daemons keep to one contract (cpvm/common/contract.py): what one sends, the other
accepts, and the shared rules give the same answer on both sides."""

from __future__ import annotations

import ipaddress

import pytest

from cpvm.common import addresses, contract
from cpvm.common.contract import END_REASONS, REDEMPTION_ERRORS, Outcome, end_reason
from cpvm.manager import decisions, proxy_api, proxy_broker, public_api
from cpvm.proxy import manager_client, websocket


@pytest.mark.parametrize("outcome", list(Outcome), ids=lambda o: o.name)
def test_every_end_reason_the_proxy_can_report_is_accepted_by_the_manager(outcome):
    # The proxy reports end_reason(outcome) for a redeemed session, whatever ended it.
    report = {
        "reason": end_reason(outcome),
        "bytes_to_client": 1,
        "bytes_to_server": 2,
        "duration": 3.5,
    }
    accepted = proxy_api._end_report(report)
    assert accepted["reason"] == end_reason(outcome)


def test_outcomes_that_cannot_end_a_redeemed_session_are_reported_as_error():
    assert end_reason(Outcome.INVALID_TOKEN) == "error"
    assert end_reason(Outcome.RATE_LIMITED) == "error"
    assert end_reason(Outcome.IDLE_TIMEOUT) == "idle_timeout"
    assert "error" in END_REASONS and "invalid_token" not in END_REASONS


def test_every_redemption_error_has_a_status_a_message_and_a_close_code():
    manager_errors = {e for e in proxy_broker.REDEEM_STATUS if e is not None}
    assert manager_errors == set(proxy_broker.REDEEM_MESSAGE)
    # Each error the manager can answer reaches the browser with its own close code.
    assert manager_errors <= set(REDEMPTION_ERRORS)
    codes = [REDEMPTION_ERRORS[e].code for e in manager_errors]
    assert len(codes) == len(set(codes)) and all(4000 <= c < 5000 for c in codes)


def test_one_client_address_rule_for_both_daemons():
    # Both daemons call the very same function ...
    assert websocket.client_address is addresses.client_address
    assert public_api.client_address is addresses.client_address
    # ... which the review's example once split: one daemon said 10.1.1.1, the other 10.2.2.2.
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert addresses.client_address("10.1.1.1", "<script>, 10.2.2.2", trusted) == "10.2.2.2"
    assert addresses.client_address("10.1.1.1", ["<script>", "10.2.2.2"], trusted) == "10.2.2.2"
    assert addresses.client_address("10.1.1.1", "1.2.3.4, <script>", trusted) == "10.1.1.1"
    assert addresses.client_address("10.1.1.1", "6.6.6.6, 1.2.3.4", trusted) == "1.2.3.4"
    assert addresses.client_address("203.0.113.9", "1.2.3.4", trusted) == "203.0.113.9"


def test_the_console_url_names_the_path_the_proxy_serves():
    url = decisions.console_url("cpvm.example", 8443, True, "T" * 43, None)
    assert f"path={contract.WEBSOCKET_PATH}%3Ftoken%3D" in url
    assert contract.WEBSOCKET_PATH == "websockify"


def test_vnc_tls_modes_are_one_list():
    assert manager_client.VNC_TLS_MODES is contract.VNC_TLS_MODES
    from cpvm.manager.admin import vm_commands

    assert vm_commands.VNC_TLS_MODES is contract.VNC_TLS_MODES
