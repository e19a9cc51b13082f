"""The shape of a console token, written once for both daemons.

The manager mints tokens with :func:`new_token`; cpvm refuses anything for which
:func:`looks_like_token` is false without asking the manager (a made-up token cannot cost
the manager a database transaction).
"""

from __future__ import annotations

import re
import secrets

# 32 random bytes, base64url without padding: 43 characters of [A-Za-z0-9_-].
TOKEN_BYTES = 32
TOKEN_LENGTH = 43
_TOKEN = re.compile(rf"[A-Za-z0-9_-]{{{TOKEN_LENGTH}}}")


def new_token() -> str:
    """A fresh one-time console token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def looks_like_token(value: str) -> bool:
    """Whether ``value`` could be a token :func:`new_token` minted."""
    return _TOKEN.fullmatch(value) is not None
