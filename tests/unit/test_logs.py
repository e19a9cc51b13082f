"""Log lines: redaction, and which worker wrote a text line."""

import io
import json

import pytest
from twisted.logger import Logger, LogPublisher

from cpvm.common import logs


@pytest.fixture
def settings():
    saved = dict(logs._settings)
    yield
    logs._settings.clear()
    logs._settings.update(saved)


def _emit(fmt: str, **fields) -> str:
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(logs.make_observer(out, fmt, "info"))
    Logger(namespace="cpvm.proxy.registry", observer=publisher).info(
        "redeeming token=abc123 for {client}", client="203.0.113.7", **fields
    )
    return out.getvalue()


@pytest.mark.parametrize(
    "workers, worker, named", [(1, None, False), (3, None, True), (3, 2, True)]
)
def test_text_lines_name_the_worker_when_there_are_several(settings, workers, worker, named):
    logs.configure(format="text", level="info", name="cpvm", worker=worker, workers=workers)
    line = _emit("text")
    assert "[cpvm.proxy.registry#info" in line
    assert ("worker " + str(worker or 0) in line) is named
    assert "abc123" not in line and "token=<redacted>" in line


def test_json_lines_carry_worker_and_pid_and_hide_secrets(settings):
    logs.configure(format="json", level="info", name="cpvm", worker=2, workers=3)
    record = json.loads(_emit("json", session="s-1"))
    assert record["worker"] == 2 and record["session"] == "s-1" and record["pid"] > 0
    assert "abc123" not in record["message"]


def test_a_playback_ticket_is_masked_in_a_url_or_a_fragment():
    line = logs.redact("GET /recording/data?ticket=abcDEF123_- and play#ticket=xyz")
    assert "abcDEF123" not in line and "xyz" not in line and line.count("ticket=<redacted>") == 2
