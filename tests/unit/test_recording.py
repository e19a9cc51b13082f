"""Recording files: the FBS encoder and writer against an independent reader, the
failure signal (disk slow, disk full), the input side file, and retention."""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from cpvm.proxy.recording import fbs
from cpvm.proxy.recording.recorder import (
    RecordingSettings,
    SessionRecorder,
    recording_path,
)
from cpvm.proxy.recording.retention import (
    DAY,
    RetentionService,
    StoredRecording,
    plan_deletions,
    scan,
)
from cpvm.proxy.recording.writer import DrainThread, InlineDrain, RecordingFile
from cpvm.rfb import ClientInputScanner, ServerInit
from tests.fbs_reader import parse_handshake, read_fbs

PIXEL_FORMAT = bytes([16, 16, 0, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0])
BROWSER_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0])
SERVER_INIT = ServerInit(1024, 768, PIXEL_FORMAT, "● REC web-01".encode())


def direct(fn, *args):
    fn(*args)


def recorder(tmp_path, *, drain=None, record_input=False, max_buffer=1 << 20, failures=None):
    failures = [] if failures is None else failures
    return SessionRecorder(
        settings=RecordingSettings(str(tmp_path), record_input=record_input, max_buffer=max_buffer),
        session_id="5f1c0d2e-0000-4000-8000-000000000001",
        drain=drain or InlineDrain(),
        call_from_thread=direct,
        on_failure=failures.append,
    )


def finished(d):
    results = []
    d.addBoth(results.append)
    assert results, "the summary was not ready"
    return results[0]


chunks_and_gaps = st.lists(
    st.tuples(st.binary(min_size=0, max_size=300), st.floats(0, 5, allow_nan=False)),
    max_size=40,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chunks=chunks_and_gaps, start=st.floats(0, 1e6, allow_nan=False))
def test_reader_rebuilds_the_stream_byte_for_byte(tmp_path_factory, chunks, start):
    tmp_path = tmp_path_factory.mktemp("rec")
    rec = recorder(tmp_path)
    now = start
    rec.start(SERVER_INIT, now)
    stamps = []
    for data, gap in chunks:
        now += gap
        rec.server_data(data, now, BROWSER_FORMAT)
        if data:
            stamps.append(int((now - start) * 1000))
    summary = finished(rec.finish(now + 1))

    raw = Path(rec.path).read_bytes()
    parsed = read_fbs(raw)
    assert not parsed.truncated
    assert parsed.blocks[0].timestamp_ms == 0
    hs = parse_handshake(parsed.stream())
    assert hs.version == b"RFB 003.003\n"
    assert (hs.width, hs.height, hs.name) == (1024, 768, SERVER_INIT.name)
    if stamps:  # the server sent updates: they are in the browser's pixel format
        assert hs.pixel_format == BROWSER_FORMAT
    assert hs.rest == b"".join(data for data, _ in chunks)
    data_stamps = [b.timestamp_ms for b in parsed.blocks[1:]]
    assert data_stamps == stamps
    assert data_stamps == sorted(data_stamps)
    assert summary.size == len(raw)
    assert summary.sha256 == hashlib.sha256(raw).hexdigest()
    assert summary.complete and summary.error is None
    assert summary.duration == int((now + 1 - start) * 1000) / 1000


def test_file_is_private_and_named_by_the_session(tmp_path):
    rec = recorder(tmp_path)
    rec.start(SERVER_INIT, 0.0)
    finished(rec.finish(0.5))
    path = Path(rec.path)
    assert path.name == "5f1c0d2e-0000-4000-8000-000000000001.fbs"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A session without any update still yields a playable file: header and handshake.
    parsed = read_fbs(path.read_bytes())
    assert parse_handshake(parsed.stream()).rest == b""
    assert parse_handshake(parsed.stream()).pixel_format == PIXEL_FORMAT


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", ".hidden", "x" * 200])
def test_session_ids_that_cannot_name_a_file(tmp_path, bad):
    with pytest.raises(ValueError):
        recording_path(str(tmp_path), bad)


def test_timestamps_never_go_backwards_and_stay_u32():
    enc = fbs.FbsEncoder(100.0)
    enc.start(SERVER_INIT, 100.0)
    assert enc.elapsed_ms(105.0) == 5000
    assert enc.elapsed_ms(101.0) == 5000  # the clock stepped back
    assert enc.elapsed_ms(100.0 + 60 * DAY) == fbs.MAX_TIMESTAMP_MS
    with pytest.raises(ValueError):
        fbs.block(b"x", -1)


def test_input_side_file_only_when_asked(tmp_path):
    (tmp_path / "off").mkdir()
    rec = recorder(tmp_path / "off")
    rec.start(SERVER_INIT, 0.0)
    rec.client_data(b"\x04\x01\x00\x00\x00\x00\x00a", 0.1)
    finished(rec.finish(1.0))
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [Path(rec.path).name]

    (tmp_path / "on").mkdir()
    rec = recorder(tmp_path / "on", record_input=True)
    rec.start(SERVER_INIT, 10.0)
    key = b"\x04\x01\x00\x00\x00\x00\x00a"
    rec.client_data(key, 10.25)
    rec.server_data(b"\x02", 10.5)  # Bell
    rec.client_data(key, 11.0)
    summary = finished(rec.finish(12.0))
    side = read_fbs((tmp_path / "on" / (rec.session_id + ".input.fbs")).read_bytes())
    assert [(b.timestamp_ms, b.data) for b in side.blocks] == [(250, key), (1000, key)]
    main = read_fbs(Path(rec.path).read_bytes())
    assert [b.timestamp_ms for b in main.blocks] == [0, 500]  # handshake at 0, same clock
    assert summary.input_size == 12 + 2 * (8 + 8)


class HeldDrain:
    """A disk that takes nothing until released."""

    def __init__(self):
        self.jobs = []

    def submit(self, job):
        self.jobs.append(job)

    def release(self):
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            job()


def test_a_slow_disk_fails_the_recording_once_and_keeps_whole_blocks(tmp_path):
    drain = HeldDrain()
    failures = []
    rec = recorder(tmp_path, drain=drain, max_buffer=10_000, failures=failures)
    rec.start(SERVER_INIT, 0.0)
    for i in range(20):
        rec.server_data(bytes([i]) * 1000, i / 10)
    assert len(failures) == 1 and "too slow" in failures[0]
    assert rec.failure == failures[0]
    drain.release()
    d = rec.finish(3.0)
    drain.release()
    summary = finished(d)
    assert not summary.complete and "too slow" in summary.error
    raw = Path(rec.path).read_bytes()
    parsed = read_fbs(raw)
    assert not parsed.truncated
    rest = parse_handshake(parsed.stream()).rest
    assert 0 < len(rest) < 20_000 and rest == b"".join(
        bytes([i]) * 1000 for i in range(len(rest) // 1000)
    )
    assert summary.sha256 == hashlib.sha256(raw).hexdigest() and summary.size == len(raw)


def test_disk_full_keeps_the_file_at_its_last_whole_block(tmp_path, monkeypatch):
    real_writev = os.writev
    budget = [600]

    def writev(fd, views):  # the disk fills part-way through a block
        total = sum(len(v) for v in views)
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        take = min(total, budget[0])
        budget[0] -= take
        return real_writev(fd, [b"".join(bytes(v) for v in views)[:take]])

    monkeypatch.setattr(os, "writev", writev)
    failures = []
    rec = recorder(tmp_path, failures=failures)
    rec.start(SERVER_INIT, 0.0)
    for i in range(5):
        rec.server_data(bytes([65 + i]) * 200, i)
    summary = finished(rec.finish(6.0))
    assert failures and "ENOSPC" in failures[0]
    assert not summary.complete and "ENOSPC" in summary.error
    raw = Path(rec.path).read_bytes()
    parsed = read_fbs(raw)
    # 600 bytes hold the header (12), the handshake block (64) and two 208-byte blocks.
    assert not parsed.truncated and len(parsed.blocks) == 3
    assert summary.sha256 == hashlib.sha256(raw).hexdigest() and summary.size == len(raw)


def test_partial_writes_are_continued(tmp_path, monkeypatch):
    real_writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, views: real_writev(fd, [bytes(views[0][:3])]))
    rec = recorder(tmp_path)
    rec.start(SERVER_INIT, 0.0)
    rec.server_data(b"0123456789", 0.1)
    summary = finished(rec.finish(1.0))
    assert summary.complete
    assert parse_handshake(read_fbs(Path(rec.path).read_bytes()).stream()).rest == b"0123456789"


def test_an_existing_file_is_never_overwritten(tmp_path):
    Path(recording_path(str(tmp_path), "5f1c0d2e-0000-4000-8000-000000000001")).write_bytes(b"x")
    failures = []
    rec = recorder(tmp_path, failures=failures)
    rec.start(SERVER_INIT, 0.0)
    rec.server_data(b"data", 0.1)
    summary = finished(rec.finish(1.0))
    assert failures and "cannot create" in failures[0] and not summary.complete
    assert Path(rec.path).read_bytes() == b"x"


def test_the_drain_thread_writes_off_the_calling_thread(tmp_path):
    # The reactor side only queues; results come back through call_from_thread.
    drain = DrainThread()
    back: queue.SimpleQueue = queue.SimpleQueue()
    rec_file = RecordingFile(
        str(tmp_path / "t.fbs"),
        drain=drain,
        call_from_thread=lambda fn, *a: back.put((fn, a)),
        max_buffer=1 << 30,
        on_failure=lambda reason: pytest.fail(reason),
    )
    payload = os.urandom(64 * 1024)
    for _ in range(64):
        assert rec_file.write([payload])
    d = rec_file.finish()
    fn, args = back.get(timeout=30)
    fn(*args)
    result = finished(d)
    drain.stop()
    assert result.complete and result.size == 64 * len(payload)
    assert result.sha256 == hashlib.sha256(payload * 64).hexdigest()
    assert rec_file.waiting == 0


def test_scanner_keeps_the_browsers_pixel_format():
    scanner = ClientInputScanner()
    msg = b"\x00\x00\x00\x00" + BROWSER_FORMAT
    assert scanner.feed(msg[:7]) == 0 and scanner.pixel_format is None
    assert scanner.feed(msg[7:] + b"\x04\x01\x00\x00\x00\x00\x00a") == 1
    assert scanner.pixel_format == BROWSER_FORMAT and not scanner.desynchronised


# -- retention -----------------------------------------------------------------------------


def stored(name, age_days, size, now=1000 * DAY):
    return StoredRecording(name, now - age_days * DAY, size)


def test_retention_age_then_space_oldest_first():
    now = 1000 * DAY
    recs = [
        stored("new", 1, 50),
        stored("old", 40, 10),
        stored("mid", 5, 60),
        stored("ancient", 90, 5),
    ]
    plan = plan_deletions(recs, now=now, retention_days=30, max_bytes=60, keep=frozenset())
    assert [(d.recording.session_id, d.reason) for d in plan] == [
        ("ancient", "age"),
        ("old", "age"),
        ("mid", "space"),
    ]


def test_retention_never_deletes_a_recording_being_written_and_zero_disables():
    now = 1000 * DAY
    recs = [stored("live", 90, 100), stored("a", 2, 10), stored("b", 1, 10)]
    plan = plan_deletions(recs, now=now, retention_days=30, max_bytes=15, keep=frozenset({"live"}))
    assert [d.recording.session_id for d in plan] == ["a", "b"]
    assert plan_deletions(recs, now=now, retention_days=0, max_bytes=0) == []


@given(
    st.lists(
        st.tuples(st.integers(0, 100), st.integers(0, 1000)), max_size=30, unique_by=lambda t: t[0]
    ),
    st.integers(1, 5000),
)
def test_retention_space_property(items, max_bytes):
    recs = [StoredRecording(f"s{i}", float(mtime), size) for i, (mtime, size) in enumerate(items)]
    plan = plan_deletions(recs, now=0.0, retention_days=0, max_bytes=max_bytes)
    gone = {d.recording.session_id for d in plan}
    left = [r for r in recs if r.session_id not in gone]
    assert sum(r.size for r in left) <= max_bytes
    # Oldest first: every deleted recording is at least as old as every one kept, and
    # keeping the newest deleted one would have broken the limit.
    if plan:
        assert max(d.recording.mtime for d in plan) <= min((r.mtime for r in left), default=1e18)
        assert sum(r.size for r in left) + plan[-1].recording.size > max_bytes


def test_retention_service_deletes_and_reports(tmp_path):
    clock = Clock()
    clock.advance(1000 * DAY)
    for name, age, size in [("a", 40, 10), ("b", 3, 30), ("c", 1, 30), ("live", 50, 5)]:
        path = tmp_path / f"{name}.fbs"
        path.write_bytes(b"x" * size)
        os.utime(path, (clock.seconds() - age * DAY,) * 2)
    (tmp_path / "b.input.fbs").write_bytes(b"y" * 20)
    os.utime(tmp_path / "b.input.fbs", (clock.seconds() - 3 * DAY,) * 2)
    (tmp_path / "unrelated.txt").write_bytes(b"z" * 100)
    deleted = []
    svc = RetentionService(
        reactor=clock,
        directory=str(tmp_path),
        retention_days=30,
        max_bytes=40,
        active=lambda: ["live"],
        on_deleted=lambda s, why: deleted.append((s, why)),
        run_in_thread=lambda fn, *a: succeed(fn(*a)),
    )
    assert {r.session_id: r.size for r in scan(str(tmp_path))}["b"] == 50
    svc.startService()
    assert deleted == [("a", "age"), ("b", "space")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.fbs", "live.fbs", "unrelated.txt"]
    svc.stopService()


def test_recordings_service_tracks_active_and_deleted(tmp_path):
    from cpvm.proxy.recording.service import Recordings

    clock = Clock()
    clock.callFromThread = lambda fn, *a: fn(*a)  # type: ignore[attr-defined]
    directory = tmp_path / "rec"
    svc = Recordings(
        reactor=clock,
        settings=RecordingSettings(str(directory)),
        retention_days=0,
        max_bytes=1,
        drain=InlineDrain(),
        run_in_thread=lambda fn, *a: succeed(fn(*a)),
    )
    svc.startService()
    assert not directory.exists()  # made with the first recording
    rec = svc.recorder("live-1", on_failure=pytest.fail)
    rec.start(SERVER_INIT, clock.seconds())
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    rec.server_data(b"x" * 100, clock.seconds())
    assert svc.active == 1
    svc.retention.apply()  # over max_bytes, but being written: kept
    # While written it is a .part file: whole recordings only have the plain name.
    assert (directory / "live-1.fbs.part").exists() and not (directory / "live-1.fbs").exists()
    assert svc.take_deleted() == []
    summary = finished(svc.finish(rec, clock.seconds() + 1))
    assert summary.complete and svc.active == 0
    svc.retention.apply()
    assert list(directory.iterdir()) == []
    taken = svc.take_deleted()
    assert taken == ["live-1"]
    svc.give_back_deleted(taken)
    assert svc.take_deleted() == ["live-1"]
    finished(svc.stopService())


def test_retention_leaves_other_processes_recordings_alone(tmp_path):
    # Another worker process's recording in progress: a .part file, counted, never
    # deleted for space; a crash's leftover .part goes by age.
    now = 1000 * DAY
    for name, age, size in [
        ("theirs.fbs.part", 0.1, 500),
        ("old.fbs", 3, 10),
        ("crash.fbs.part", 90, 5),
    ]:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age * DAY,) * 2)
    recs = {r.session_id: r for r in scan(str(tmp_path))}
    assert recs["theirs"].partial and not recs["old"].partial
    plan = plan_deletions(recs.values(), now=now, retention_days=30, max_bytes=100)
    assert [(d.recording.session_id, d.reason) for d in plan] == [
        ("crash", "age"),
        ("old", "space"),
    ]


def test_a_pixel_format_change_after_the_start_is_logged_once(tmp_path):
    from twisted.logger import globalLogPublisher

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        rec = recorder(tmp_path)
        rec.start(SERVER_INIT, 0.0)
        rec.server_data(b"a", 0.1, BROWSER_FORMAT)
        rec.server_data(b"b", 0.2, bytes(BROWSER_FORMAT))  # the same format, new bytes
        assert not [e for e in seen if "pixel format" in e.get("log_format", "")]
        rec.server_data(b"c", 0.3, PIXEL_FORMAT)
        rec.server_data(b"d", 0.4, BROWSER_FORMAT)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert len([e for e in seen if "pixel format" in e.get("log_format", "")]) == 1
    finished(rec.finish(1.0))
    assert parse_handshake(read_fbs(Path(rec.path).read_bytes()).stream()).rest == b"abcd"


def test_a_resumed_sessions_connections_are_files_of_one_recording(tmp_path):
    from cpvm.proxy.recording.recorder import latest_part
    from cpvm.proxy.recording.retention import delete

    sid = "5f1c0d2e-0000-4000-8000-000000000001"
    first = recorder(tmp_path)
    first.start(SERVER_INIT, 0.0)
    finished(first.finish(1.0))
    again = SessionRecorder(
        settings=RecordingSettings(str(tmp_path)),
        session_id=sid,
        part=2,
        drain=InlineDrain(),
        call_from_thread=direct,
        on_failure=pytest.fail,
    )
    again.start(SERVER_INIT, 5.0)
    finished(again.finish(6.0))
    assert Path(again.path).name == f"{sid}-r2.fbs"
    # Playback serves the last connection's file; retention counts and deletes them as one.
    assert latest_part(str(tmp_path), sid) == again.path
    [stored] = scan(str(tmp_path))
    assert stored.session_id == sid and stored.size == 2 * Path(first.path).stat().st_size
    (tmp_path / "other-r1.fbs").write_bytes(b"x")
    delete(str(tmp_path), sid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-r1.fbs"]
    assert latest_part(str(tmp_path), sid).endswith(f"{sid}.fbs")  # none left: the plain name
