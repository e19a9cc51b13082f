"""The console cookie: what lets the *same* browser resume a console after an unclean end.

A console URL (its one-time token) can be copied, logged or shoulder-surfed; a cookie
marked ``HttpOnly`` cannot be read by the page's scripts and is never part of the URL.
cpvm sets one on the WebSocket upgrade when the browser presents none, with
``SameSite=Strict`` (a browser sends it only on requests from cpvm's own pages) and, under
TLS, ``Secure`` and the ``__Host-`` prefix (no other host of the domain can set or
overwrite it). The manager binds a session to the cookie's SHA-256 at its first
redemption (``docs/management-api.md``); cpvm never stores it.

It identifies the browser profile, not one console: a browser that already holds a
well-formed cookie keeps it, so opening a second console does not orphan the first. It
is set on the upgrade only, never on the page: a person following a console link from
another site (the dashboard) makes a cross-site navigation, which carries no
``SameSite=Strict`` cookie, and a page answer would then replace the cookie every open
console depends on. The upgrade comes from cpvm's own page and carries it.

Pure functions: no Twisted, no state.
"""

from __future__ import annotations

import hashlib
import re
import secrets

# 32 random bytes, base64url without padding, like a token (cpvm/common/tokens.py).
COOKIE_BYTES = 32
_VALUE = re.compile(r"[A-Za-z0-9_-]{43}")
PLAIN_NAME = "cpvm_console"
# Under TLS: the browser accepts it only with Secure, Path=/ and no Domain, so a sibling
# host (another console proxy under the same url_domain, say) cannot plant one.
TLS_NAME = "__Host-cpvm_console"


def cookie_name(tls: bool) -> str:
    """The cookie's name on a listener with or without TLS."""
    return TLS_NAME if tls else PLAIN_NAME


def new_value() -> str:
    """A fresh random cookie value."""
    return secrets.token_urlsafe(COOKIE_BYTES)


def value_from_header(header: str | None, tls: bool) -> str | None:
    """The one well-formed console cookie in a ``Cookie`` request header, or None.

    None when there is none, when it is malformed, and when there are several (a cookie
    planted for a parent domain next to ours): an ambiguous proof is no proof.
    """
    if not header:
        return None
    name = cookie_name(tls)
    found = [
        value.strip()
        for key, sep, value in (part.strip().partition("=") for part in header.split(";"))
        if sep and key.strip() == name
    ]
    if len(found) != 1 or _VALUE.fullmatch(found[0]) is None:
        return None
    return found[0]


def set_cookie(value: str, tls: bool) -> str:
    """The ``Set-Cookie`` header value: a session cookie for the whole of this host."""
    attributes = "Path=/; HttpOnly; SameSite=Strict"
    if tls:
        attributes += "; Secure"
    return f"{cookie_name(tls)}={value}; {attributes}"


def cookie_hash(value: str) -> str:
    """What the manager receives and stores: SHA-256 of the value, 64 lowercase hex digits."""
    return hashlib.sha256(value.encode("ascii")).hexdigest()


def browser_proof(header: str | None, tls: bool) -> tuple[str, str | None]:
    """For one upgrade request: ``(hash to redeem with, Set-Cookie value or None)``.

    The browser's own cookie when it has a good one (nothing to set), else a new one that
    the upgrade's answer sets.
    """
    value = value_from_header(header, tls)
    if value is not None:
        return cookie_hash(value), None
    value = new_value()
    return cookie_hash(value), set_cookie(value, tls)
