"""The manager's side of session recording on the wire: the ``recording`` object of an
end report, the recordings a heartbeat says were deleted, the ``recording`` object of
``listConsoleSessions``, and :class:`PlaybackBroker` behind
``createConsoleRecordingPlayback`` and ``POST /proxy/v1/playback`` (docs/recording.md,
docs/management-api.md).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from cpvm.manager import recording_policy
from cpvm.manager.api_errors import ApiError
from cpvm.manager.config import RecordingPolicyConfig
from cpvm.manager.decisions import console_host
from cpvm.manager.signing import format_time
from cpvm.manager.store import recordings as recording_store
from cpvm.manager.store.records import Account

MAX_RECORDING_SIZE = 2**62
MAX_RECORDING_DURATION = 10**9
MAX_DELETED_PER_BEAT = 1000
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
audit = Logger(namespace="cpvm.audit")


class RecordingReportError(ValueError):
    """An end report's ``recording`` object or a heartbeat's deletions are malformed."""


def parse_summary(value: Any) -> dict[str, Any] | None:
    """An end report's ``recording`` object: size, sha256, duration, complete (or None)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RecordingReportError("recording must be an object")
    size, sha, duration, complete = (
        value.get(k) for k in ("size", "sha256", "duration", "complete")
    )
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_RECORDING_SIZE:
        raise RecordingReportError("recording.size must be a number of bytes")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise RecordingReportError("recording.sha256 must be 64 lower-case hex digits")
    if (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not 0 <= duration <= MAX_RECORDING_DURATION
    ):
        raise RecordingReportError("recording.duration must be a number of seconds")
    if not isinstance(complete, bool):
        raise RecordingReportError("recording.complete must be true or false")
    return {"size": size, "sha256": sha, "duration": float(duration), "complete": complete}


def parse_deleted(body: dict[str, Any]) -> list[str]:
    """A heartbeat's ``recordings_deleted``: session ids whose recording retention removed."""
    items = body.get("recordings_deleted", [])
    if not isinstance(items, list) or len(items) > MAX_DELETED_PER_BEAT:
        raise RecordingReportError(
            f"recordings_deleted must be a list of at most {MAX_DELETED_PER_BEAT} session ids"
        )
    out = []
    for item in items:
        try:
            out.append(str(uuid.UUID(str(item))))
        except ValueError:
            raise RecordingReportError(
                "recordings_deleted holds something not a session id"
            ) from None
    return out


class PlaybackError(Exception):
    """Why no playback URL: ``code`` (CloudStack's error code) and its text."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class Playback:
    """A one-time playback URL and when it stops working."""

    url: str
    expires: float


# The proxy API's answers to a playback ticket that opens nothing.
TICKET_ERRORS: dict[str, tuple[int, str]] = {
    "invalid_ticket": (404, "no such playback link"),
    "wrong_proxy": (403, "this playback link is for another console proxy"),
    "ticket_used": (409, "this playback link was already used"),
    "expired_ticket": (410, "this playback link has expired"),
}


class PlaybackBroker:
    """Issues one-time playback URLs on the proxy that holds a recording, and spends them."""

    _log = Logger()

    def __init__(self, db: Any, clock: Any, config: RecordingPolicyConfig, url_domain: str | None):
        self._db = db
        self._clock = clock
        self._config = config
        self._url_domain = url_domain

    @inlineCallbacks
    def create(self, caller: Account, session_id: str):
        """A URL for ``session_id``'s recording; :class:`PlaybackError` when not (431 for a
        caller without the right, as for a session it cannot see)."""
        now = self._clock.seconds()
        ticket = recording_policy.new_ticket()
        config = self._config

        def txn(tx):
            record = recording_store.get_recording(tx, session_id)
            if record is None or not recording_policy.may_play_back(
                is_admin=caller.is_admin,
                caller_account_id=caller.id,
                session_account_id=record.account_id,
                account_playback=config.account_playback,
            ):
                return PlaybackError(431, "Invalid parameter id: no recording you may play back")
            if not record.recorded:
                return PlaybackError(431, "Invalid parameter id: this session was not recorded")
            if record.deleted_at is not None:
                return PlaybackError(
                    431, "Invalid parameter id: this recording was deleted (retention)"
                )
            if record.size is None:
                return PlaybackError(431, "Invalid parameter id: the recording is not finished yet")
            where = recording_store.proxy_address(tx, record.proxy_id)
            if where is None:
                return PlaybackError(530, "the console proxy holding this recording is unknown")
            recording_store.insert_ticket(
                tx,
                ticket_hash=ticket.hash,
                session_id=session_id,
                proxy_id=record.proxy_id,
                created_by=caller.name,
                now=now,
                ttl=config.playback_ttl,
            )
            return where

        result = yield self._db.run(txn)
        if isinstance(result, PlaybackError):
            raise result
        host, port, tls, address = result
        host = console_host(host, address, self._url_domain)
        host_in_url = f"[{host}]" if ":" in host else host
        base = f"{'https' if tls else 'http'}://{host_in_url}:{port}"
        audit.info(
            "recording of session {session} opened for playback by {account}",
            audit=True,
            event="playback_issued",
            session=session_id,
            account=caller.name,
        )
        return Playback(
            recording_policy.playback_url(base, ticket.secret), now + config.playback_ttl
        )

    def recordings_of(self, session_ids: list[str]):
        """The recording facts of listed sessions: id → RecordingRecord."""
        return self._db.read(recording_store.recordings_of, session_ids)

    @inlineCallbacks
    def redeem(self, proxy_id: str, secret: str):
        """``(status, body)`` for the proxy API: the session id once, else why not."""
        ticket_hash = recording_policy.ticket_hash(secret)
        if ticket_hash is None:
            status, message = TICKET_ERRORS["invalid_ticket"]
            return status, {"error": "invalid_ticket", "message": message}
        outcome, session_id = yield self._db.run(
            recording_store.redeem_ticket, ticket_hash, proxy_id, self._clock.seconds()
        )
        if outcome != "ok":
            status, message = TICKET_ERRORS[outcome]
            self._log.info("playback ticket refused: {outcome}", outcome=outcome, proxy=proxy_id)
            return status, {"error": outcome, "message": message}
        audit.info(
            "recording of session {session} played back via proxy {proxy}",
            audit=True,
            event="played_back",
            session=session_id,
            proxy=proxy_id,
        )
        return 200, {"session_id": session_id}


def commands(playback: PlaybackBroker) -> dict[str, Any]:
    """``createConsoleRecordingPlayback`` for the public API's command table."""

    async def create_playback(request: Any, account: Account, p: dict[str, str], name: str):
        if not p.get("id"):
            raise ApiError(431, f"Unable to execute API command {name} due to missing parameter id")
        try:
            session_id = str(uuid.UUID(p["id"]))
        except ValueError:
            raise ApiError(431, "Invalid parameter id value: not a UUID") from None
        try:
            playback_ = await playback.create(account, session_id)
        except PlaybackError as e:
            raise ApiError(e.code, e.text) from None
        return 200, {
            "createconsolerecordingplaybackresponse": {
                "consolerecordingplayback": {
                    "id": session_id,
                    "url": playback_.url,
                    "expires": format_time(playback_.expires),
                }
            }
        }

    return {"createconsolerecordingplayback": create_playback}
