"""A ConsoleSession with a recorder, driven by hand (fakes, a Clock): the marker in the
desktop name, what is recorded, and on_failure end/continue when the disk is too slow."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from cpvm.common.contract import Outcome
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.recording.recorder import RecordingSettings
from cpvm.proxy.recording.service import Recordings
from cpvm.proxy.recording.sessions import SessionRecordings
from tests.fbs_reader import parse_handshake, read_fbs
from tests.unit.test_recording import HeldDrain
from tests.unit.test_session import REDEMPTION, make, to_relay


def recorded(tmp_path, drain, on_failure="end", max_buffer=1 << 20):
    clock = Clock()
    clock.callFromThread = lambda fn, *a: fn(*a)  # type: ignore[attr-defined]
    recordings = Recordings(
        reactor=clock,
        settings=RecordingSettings(str(tmp_path), on_failure=on_failure, max_buffer=max_buffer),
        retention_days=0,
        max_bytes=0,
        drain=drain,
        run_in_thread=lambda fn, *a: pytest.fail("no retention here"),
    )
    return SessionRecordings(recordings, clock, ProxyMetrics())


def session_with(glue):
    from dataclasses import replace

    from twisted.internet.defer import Deferred

    session, clock, browser, upstream, hooks, calls, redeem_d = make(Deferred())
    original = hooks.redeemed

    def redeemed(s):
        original(s)
        glue.attach(s)

    hooks.redeemed = redeemed
    to_relay(session, browser, upstream, _Redeem(redeem_d, replace(REDEMPTION, recording=True)))
    return session, browser, upstream


class _Redeem:
    """to_relay() fires the redemption with REDEMPTION; these sessions are recorded."""

    def __init__(self, d, redemption):
        self._d, self._redemption = d, redemption

    def callback(self, _):
        self._d.callback(self._redemption)


def test_recorded_session_shows_the_marker_and_records_what_it_relays(tmp_path):
    from cpvm.proxy.recording.writer import InlineDrain

    glue = recorded(tmp_path, InlineDrain())
    session, browser, upstream = session_with(glue)
    assert session.recorder is not None
    assert "\u25cf REC web-01".encode() in browser.sent
    session.upstream_data(b"\x02")  # Bell
    session.browser_data(b"\x04\x01\x00\x00\x00\x00\x00a")
    reports = []
    session.close(Outcome.CLIENT_CLOSED, "test")
    glue.end_report(session, {"reason": "client_closed"}, reports.append)
    [report] = reports
    assert report["recording"]["complete"] is True
    counted = glue._metrics.registry.get_sample_value  # type: ignore[union-attr]
    assert counted("cpvm_recordings_total", {"result": "complete"}) == 1
    assert counted("cpvm_recorded_bytes_total") == report["recording"]["size"]
    raw = (tmp_path / "s-1.fbs").read_bytes()
    hs = parse_handshake(read_fbs(raw).stream())
    assert hs.rest == b"\x02" and hs.name == "\u25cf REC web-01".encode()
    assert not (tmp_path / "s-1.input.fbs").exists()  # record_input is off


def test_a_too_slow_disk_ends_the_session_with_4024_before_it_shows_more(tmp_path):
    glue = recorded(tmp_path, HeldDrain(), max_buffer=64 * 1024)
    session, browser, upstream = session_with(glue)
    shown = len(browser.sent)
    session.upstream_data(b"x" * 100_000)
    assert session.outcome is Outcome.RECORDING_FAILED
    assert browser.closed == (4024, "session recording failed")
    assert len(browser.sent) == shown  # the chunk that could not be recorded was not shown


def test_continue_keeps_the_session_and_marks_the_recording_incomplete(tmp_path):
    drain = HeldDrain()
    glue = recorded(tmp_path, drain, on_failure="continue", max_buffer=64 * 1024)
    session, browser, upstream = session_with(glue)
    session.upstream_data(b"x" * 100_000)
    assert session.outcome is None and browser.sent.endswith(b"x" * 100_000)
    session.close(Outcome.CLIENT_CLOSED, "test")
    reports = []
    glue.end_report(session, {"reason": "client_closed"}, reports.append)
    drain.release()
    assert reports and reports[0]["recording"]["complete"] is False
