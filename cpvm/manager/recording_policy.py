"""Session recording on the manager's side, sans-IO: whether a session is recorded, who
may play a recording back, and the one-time playback tickets (docs/recording.md).

The policy is set per VM and per account (``always``, ``never`` or unset) with a default
in ``[recording] default``. ``always`` on either wins — a security team that wants one VM
(or one account) recorded cannot be overruled by the other — then ``never`` on either,
then the default.
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.common.tokens import looks_like_token, new_token
from cpvm.manager.secrets_box import sha256_hex

POLICIES = ("always", "never")
# What the CLI accepts: a policy, or "default" to unset it.
POLICY_CHOICES = (*POLICIES, "default")


def stored_policy(choice: str) -> str | None:
    """The column value for a CLI/API choice (``default`` → NULL)."""
    if choice not in POLICY_CHOICES:
        raise ValueError(f"expected one of {', '.join(POLICY_CHOICES)}, got {choice!r}")
    return None if choice == "default" else choice


def is_recorded(vm_policy: str | None, account_policy: str | None, default: str) -> bool:
    """Whether a session on a VM, for an account, is recorded."""
    policies = (vm_policy, account_policy)
    if "always" in policies:
        return True
    if "never" in policies:
        return False
    return default == "always"


def may_play_back(
    *, is_admin: bool, caller_account_id: str, session_account_id: str, account_playback: bool
) -> bool:
    """Administrators may play back any recording; an account its own sessions' ones when
    ``[recording] account_playback`` allows."""
    return is_admin or (account_playback and caller_account_id == session_account_id)


@dataclass(frozen=True)
class PlaybackTicket:
    """A new ticket: the secret goes into the URL once; only its hash is stored."""

    secret: str
    hash: str


def new_ticket() -> PlaybackTicket:
    """A fresh one-time playback ticket (the shape of a console token)."""
    secret = new_token()
    return PlaybackTicket(secret, sha256_hex(secret))


def ticket_hash(secret: str) -> str | None:
    """The stored hash of a ticket a proxy presents, or None when it cannot be one."""
    return sha256_hex(secret) if looks_like_token(secret) else None


def playback_url(base_url: str, secret: str) -> str:
    """The page on the proxy that plays a recording; the ticket rides in the fragment,
    which browsers never send (docs/recording.md)."""
    return f"{base_url.rstrip('/')}/recording/play#ticket={secret}"
