"""May a used token resume its session? (cpvm/manager/resume.py, no database)."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from cpvm.common.contract import END_REASONS, UNCLEAN_END_REASONS, is_unclean_end
from cpvm.manager import resume

COOKIE = hashlib.sha256(b"the browser's cookie").hexdigest()
OTHER = hashlib.sha256(b"another browser's cookie").hexdigest()
LOST = resume.Ended(
    ended_at=1000.0,
    end_reason="client_lost",
    acquired_at=900.0,
    browser_hash=COOKIE,
    terminate_requested=False,
    bound_address=None,
)


def decide(session=LOST, *, browser_hash=COOKIE, address="203.0.113.7", now=1010.0, **kw):
    kw.setdefault("window", 30.0)
    kw.setdefault("max_duration", None)
    return resume.decide(session, browser_hash=browser_hash, client_address=address, now=now, **kw)


def test_the_same_browser_resumes_within_the_window():
    verdict = decide()
    assert verdict.resume and verdict.why == "resumed" and verdict.remaining_duration is None
    assert decide(now=1030.0).resume  # the window's last second counts


@pytest.mark.parametrize(
    "change, why",
    [
        ({"browser_hash": OTHER}, "not the browser the session was opened in"),
        ({"browser_hash": None}, "not the browser the session was opened in"),
        ({"browser_hash": COOKIE.upper()}, "not the browser the session was opened in"),
        ({"now": 1030.5}, "reconnect window passed"),
        ({"window": 0}, "reconnect window off"),
    ],
)
def test_anyone_else_or_later_is_refused(change, why):
    verdict = decide(**change)
    assert not verdict.resume and verdict.why == why


def test_a_session_opened_without_a_cookie_is_never_resumed():
    verdict = decide(replace(LOST, browser_hash=None), browser_hash=None)
    assert not verdict.resume


@pytest.mark.parametrize("reason", sorted(END_REASONS - UNCLEAN_END_REASONS))
def test_a_clean_end_is_final(reason):
    verdict = decide(replace(LOST, end_reason=reason))
    assert not verdict.resume and verdict.why == f"session ended cleanly ({reason})"


@pytest.mark.parametrize("reason", sorted(UNCLEAN_END_REASONS))
def test_unclean_ends_are_the_lost_browser_and_the_lost_or_restarted_proxy(reason):
    assert decide(replace(LOST, end_reason=reason)).resume


def test_what_counts_as_unclean():
    # A close by the person, the limits and a termination are clean; only losses are not.
    assert UNCLEAN_END_REASONS == {"client_lost", "shutdown", "proxy_lost"}
    for clean in ("client_closed", "idle_timeout", "max_duration", "terminated", "error"):
        assert not is_unclean_end(clean)
    assert not is_unclean_end(None)


def test_a_live_or_terminated_session_is_not_resumed():
    assert decide(replace(LOST, ended_at=None)).why == "session still live"
    terminated = decide(replace(LOST, terminate_requested=True))
    assert not terminated.resume and terminated.why == "session was terminated"


def test_a_bound_address_must_match():
    bound = replace(LOST, bound_address="203.0.113.7")
    assert decide(bound).resume
    assert decide(bound, address="::ffff:203.0.113.8").why == "client address differs"
    assert decide(bound, address="198.51.100.1").why == "client address differs"


def test_the_time_limit_counts_from_the_first_redemption():
    verdict = decide(max_duration=300.0)
    assert verdict.resume and verdict.remaining_duration == pytest.approx(190.0)
    spent = decide(max_duration=110.0)
    assert not spent.resume and spent.why == "session time limit reached"
