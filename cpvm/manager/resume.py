"""May this redemption of an already used token resume its session? (sans-IO)

A console token is redeemed once. The one exception: the session it opened ended
*uncleanly* (the browser's connection was lost, its proxy restarted or crashed: see
``cpvm.common.contract.UNCLEAN_END_REASONS``), and the same browser comes back within
``[tokens] reconnect_window`` seconds of that end. "The same browser" is proven by the
console cookie cpvm sets (``cpvm.proxy.browser_cookie``): the manager stored its SHA-256 at
the first redemption, and the new redemption must present the same hash. An intercepted
URL does not carry it. With ``bind_client_address`` the address must match too.

:func:`decide` only decides, on values read in the redeeming transaction; the caller makes
the decision stick with one conditional UPDATE (``resume_store.resume_session``), so two
managers on one database cannot both resume the same end. A refusal is answered as a reused
token (``token_used``); :attr:`Verdict.why` is for the manager's log only.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from cpvm.common.contract import is_unclean_end, looks_like_browser_hash
from cpvm.manager.decisions import same_address


@dataclass(frozen=True)
class Ended:
    """What the manager knows of the session a used token opened."""

    ended_at: float | None  # None: still live
    end_reason: str | None
    acquired_at: float
    browser_hash: str | None  # bound at the first redemption
    terminate_requested: bool  # an administrator asked for its end
    # The address the first redemption was bound to ([tokens] bind_client_address), or None.
    bound_address: str | None


@dataclass(frozen=True)
class Verdict:
    """``resume`` true: reopen the session; else ``why`` (a fixed phrase, for the log)."""

    resume: bool
    why: str
    # For a resume: what is left of the manager's session time limit (None: no limit).
    remaining_duration: float | None = None


def decide(
    session: Ended,
    *,
    browser_hash: str | None,
    client_address: str,
    now: float,
    window: float,
    max_duration: float | None,
) -> Verdict:
    """Whether a redemption presenting ``browser_hash`` from ``client_address`` at ``now``
    may resume ``session``. Every other check of the token (its proxy, ``extra``, the VM,
    the account) is the caller's, as for a first redemption."""
    if window <= 0:
        return Verdict(False, "reconnect window off")
    if session.ended_at is None:
        return Verdict(False, "session still live")
    if not is_unclean_end(session.end_reason):
        return Verdict(False, f"session ended cleanly ({session.end_reason})")
    if session.terminate_requested:
        return Verdict(False, "session was terminated")
    if now - session.ended_at > window:
        return Verdict(False, "reconnect window passed")
    if not same_browser(session.browser_hash, browser_hash):
        return Verdict(False, "not the browser the session was opened in")
    if session.bound_address is not None and not same_address(
        session.bound_address, client_address
    ):
        return Verdict(False, "client address differs")
    remaining = None
    if max_duration:
        remaining = max_duration - (now - session.acquired_at)
        if remaining <= 0:
            return Verdict(False, "session time limit reached")
    return Verdict(True, "resumed", remaining)


def same_browser(bound: str | None, presented: str | None) -> bool:
    """Constant-time comparison of two cookie hashes; a missing or malformed one never
    matches (a session redeemed without a cookie can never be resumed)."""
    if not looks_like_browser_hash(bound) or not looks_like_browser_hash(presented):
        return False
    assert bound is not None and presented is not None
    return hmac.compare_digest(bound.encode("ascii"), presented.encode("ascii"))
