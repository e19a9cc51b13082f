"""Spending a one-time playback ticket with the manager (``POST /proxy/v1/playback``,
docs/management-api.md): which session's recording the ticket opens, exactly once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cpvm.proxy.recording.player import PlaybackRefused

# The manager's refusals the page shows as they are; anything else is "unavailable".
_REFUSALS = (403, 404, 409, 410)


async def redeem_playback(
    post: Callable[[str, dict], Awaitable[tuple[int, Any]]], ticket: str, instance: str | None
) -> str:
    """The session id a ticket opens; ``PlaybackRefused`` with the manager's status and
    message, or 503 when the manager cannot be reached or answers nonsense."""
    from cpvm.proxy.manager_client import ManagerUnavailable  # one way: the client imports us

    try:
        status, body = await post("/proxy/v1/playback", {"ticket": ticket, "instance": instance})
    except ManagerUnavailable as e:
        raise PlaybackRefused(503, "the management server is unreachable") from e
    if status == 200 and isinstance(body, dict):
        session_id = body.get("session_id")
        if isinstance(session_id, str) and session_id:
            return session_id
    message = body.get("message") if isinstance(body, dict) else None
    if status in _REFUSALS:
        raise PlaybackRefused(status, str(message or "this playback link is not valid")[:200])
    raise PlaybackRefused(503, f"the management server answered HTTP {status}")
