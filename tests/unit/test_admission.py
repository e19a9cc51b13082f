"""Admission in SessionRegistry: pending cap, token shape, failed-redemption rate limit.

The manager is a stand-in returning Deferreds the test fires; the clock is a ``Clock``.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from cpvm.common.contract import Outcome
from cpvm.common.inifile import IniReader
from cpvm.common.tokens import TOKEN_LENGTH, looks_like_token, new_token
from cpvm.proxy.config import parse_config
from cpvm.proxy.manager_client import ManagerUnavailable, RedemptionRefused
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.registry import SessionRegistry
from cpvm.proxy.tap import registry_settings


class StandInManager:
    def __init__(self):
        self.calls: list[Deferred] = []

    def redeem(self, token, extra, client):
        d: Deferred = Deferred()
        self.calls.append(d)
        return d


def sessions_with(settings: str):
    clock = Clock()
    config = parse_config(IniReader("test.conf", f"[server]\npublic_host = x\n{settings}"))
    manager = StandInManager()
    return (
        SessionRegistry(clock, registry_settings(config), manager, ProxyMetrics()),
        manager,
        clock,
    )


def outcome_of(d: Deferred):
    results = []
    d.addBoth(results.append)
    if not results:
        return None
    result = results[0]
    return result.value.outcome if hasattr(result, "value") else result


def refused(err: str):
    return RedemptionRefused(Outcome.INVALID_TOKEN, err, "no")


def test_token_shape_is_what_the_manager_mints():
    token = new_token()
    assert len(token) == TOKEN_LENGTH and looks_like_token(token)
    for bad in (
        "",
        "not-a-token",
        token[:-1],
        token + "A",
        token[:-1] + "=",
        token[:-1] + "/",
        token[:-1] + "\n",
        "é" * TOKEN_LENGTH,
    ):
        assert not looks_like_token(bad), bad


def test_malformed_tokens_never_reach_the_manager():
    sessions, manager, _ = sessions_with("")
    d = sessions._redeem("not-a-token", None, "192.0.2.1")
    assert outcome_of(d) is Outcome.INVALID_TOKEN
    assert manager.calls == []


def test_pending_redemptions_have_their_own_cap():
    sessions, manager, _ = sessions_with("[session]\nmax_pending = 2\nmax_sessions = 10\n")
    sessions._redeem(new_token(), None, "192.0.2.1")
    assert not sessions.too_many_pending()
    sessions._redeem(new_token(), None, "192.0.2.2")
    assert sessions.too_many_pending() and not sessions.at_capacity()
    manager.calls[0].errback(refused("invalid_token"))
    assert sessions.pending == 1 and not sessions.too_many_pending()


def test_refused_sessions_do_not_count_against_max_sessions():
    sessions, manager, _ = sessions_with("[session]\nmax_sessions = 2\n")
    for i in range(10):
        sessions._redeem(new_token(), None, f"192.0.2.{i}")
        manager.calls[-1].errback(refused("invalid_token"))
    assert not sessions.at_capacity()
    sessions._redeem(new_token(), None, "192.0.2.100")
    sessions._redeem(new_token(), None, "192.0.2.101")
    assert sessions.at_capacity()  # two pending fill max_sessions


def test_failed_redemptions_are_rate_limited_per_address():
    sessions, manager, clock = sessions_with(
        "[session]\nfailed_redemption_burst = 3\nfailed_redemption_rate = 0.5\n"
    )
    for _ in range(3):
        sessions._redeem(new_token(), None, "192.0.2.1")
        manager.calls[-1].errback(refused("invalid_token"))
    assert outcome_of(sessions._redeem(new_token(), None, "192.0.2.1")) is Outcome.RATE_LIMITED
    assert outcome_of(sessions._redeem("garbage", None, "192.0.2.1")) is Outcome.RATE_LIMITED
    assert len(manager.calls) == 3
    # Another address is not affected; after 2 s one more attempt is allowed.
    sessions._redeem(new_token(), None, "192.0.2.2")
    assert len(manager.calls) == 4
    clock.advance(2)
    sessions._redeem(new_token(), None, "192.0.2.1")
    assert len(manager.calls) == 5


def test_concurrent_attempts_spend_the_bucket_before_the_manager_answers():
    sessions, manager, _ = sessions_with("[session]\nfailed_redemption_burst = 2\n")
    for _ in range(5):
        sessions._redeem(new_token(), None, "192.0.2.1")
    assert len(manager.calls) == 2


@pytest.mark.parametrize("answer", ["ok", "unavailable"])
def test_good_redemptions_and_manager_outages_give_the_attempt_back(answer):
    sessions, manager, _ = sessions_with("[session]\nfailed_redemption_burst = 1\n")
    for _ in range(5):
        sessions._redeem(new_token(), None, "192.0.2.1")
        if answer == "ok":
            manager.calls[-1].callback(object())
        else:
            manager.calls[-1].errback(ManagerUnavailable("down"))
    assert len(manager.calls) == 5
