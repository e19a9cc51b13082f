"""Log output of the daemons: text or JSON lines, level filtering, redaction, audit file.

twistd builds the application (``makeService``) before it starts logging, so
``makeService`` calls ``configure()`` and twistd's ``--logger=cpvm.common.logs.observer``
then gets an observer built from the configuration.

Redaction is a last line of defence: our own code never logs a token, password or
signature, but a library at debug level might log a request line; anything shaped
like ``token=…``/``signature=…``/``apiKey=…``/``ticket=…`` (a playback URL's) or a proxy key is masked before output.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import IO

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from zope.interface import implementer

_SECRET = re.compile(
    r"(?i)\b(token|extra|signature|apikey|secretkey|password|ticket)=[^&\s\"']+"
    r"|cpvmk_[A-Za-z0-9]+\.[A-Za-z0-9_\-]+"
    r"|(?i:bearer)\s+[A-Za-z0-9_.\-]+"
)

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_settings: dict = {"format": "text", "level": "info", "name": "cpvm", "worker": 0, "workers": 1}


def redact(text: str) -> str:
    """Mask anything that looks like a secret in a formatted log line."""
    return _SECRET.sub(lambda m: (m.group(1) + "=<redacted>") if m.group(1) else "<redacted>", text)


def configure(
    *,
    format: str,
    level: str,
    name: str,
    audit_file: Path | None = None,
    worker: int | None = None,
    workers: int = 1,
) -> None:
    """Remember the log settings for ``observer()``; open the audit file now."""
    _settings.update(format=format, level=level, name=name, worker=worker or 0, workers=workers)
    if audit_file is not None:
        globalLogPublisher.addObserver(audit_observer(audit_file.open("a", encoding="utf-8")))


def _redacted_event(event: dict) -> dict:
    event = dict(event)
    text = formatEvent(event)
    event["log_format"] = "{log_text}"
    event["log_text"] = redact(text)
    return event


@implementer(ILogObserver)
class _RedactingObserver:
    def __init__(self, inner):
        self._inner = inner

    def __call__(self, event):
        self._inner(_redacted_event(event))


def make_observer(stream: IO[str], format: str, level: str) -> ILogObserver:
    """An observer writing to ``stream`` as text or JSON lines, at ``level`` and above."""
    inner: ILogObserver
    if format == "json":
        inner = _RedactingObserver(_JsonLines(stream))
    else:
        inner = FileLogObserver(stream, lambda e: redact(_classic_text(e)))
    return FilteringLogObserver(inner, [LogLevelFilterPredicate(defaultLogLevel=_LEVELS[level])])


def _classic_text(event: dict) -> str:
    if _settings["workers"] > 1 and "log_system" not in event:
        # Several processes write to one journal: say which one wrote the line.
        level = getattr(event.get("log_level"), "name", "-")
        event = dict(
            event,
            log_system=f"{event.get('log_namespace', '-')}#{level} worker {_settings['worker']}",
        )
    return formatEventAsClassicLogText(event) or ""


@implementer(ILogObserver)
class _JsonLines:
    """One JSON object per line with the structured fields we put on events."""

    def __init__(self, stream):
        self._stream = stream

    def __call__(self, event):
        record = {
            "time": event.get("log_time"),
            "level": getattr(event.get("log_level"), "name", None),
            "namespace": event.get("log_namespace"),
            "message": event.get("log_text") or formatEvent(event),
            "daemon": _settings["name"],
            "worker": _settings["worker"],
            "pid": os.getpid(),
        }
        for key in (
            "session",
            "vm",
            "account",
            "client",
            "proxy",
            "reason",
            "event",
            "bytes_to_client",
            "bytes_to_server",
            "duration",
            "code",
        ):
            if key in event and event[key] is not None:
                record[key] = event[key]
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = redact(failure.getTraceback())
        self._stream.write(json.dumps(record, default=str) + "\n")
        self._stream.flush()


def audit_observer(stream):
    """JSON lines of the audit stream only (namespace ``cpvm.audit``)."""
    inner = _JsonLines(stream)

    def observe(event):
        if event.get("log_namespace") == "cpvm.audit":
            inner(_redacted_event(event))

    return observe


def observer():
    """twistd ``--logger`` entry point: stdout, as configured in the INI file."""
    return make_observer(sys.stdout, _settings["format"], _settings["level"])
