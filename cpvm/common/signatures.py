"""How an API client signs a CloudStack request: written once for the manager that checks
signatures (:mod:`cpvm.manager.signing`) and the clients cpvm ships (``cpvm-probe``).

The string to sign: every parameter except ``signature``, values URL-encoded like Java's
``URLEncoder`` with ``+`` written ``%20`` (Python: ``quote(value, safe="*")``), sorted by
key, joined as ``key=value`` with ``&``, then the whole string lower-cased; HMAC-SHA1 with
the secret key, base64.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote


def string_to_sign(params: Mapping[str, str], java_tilde: bool = False) -> str:
    """The canonical, lower-cased query CloudStack signs."""
    parts = []
    for key in sorted((k for k in params if k.lower() != "signature"), key=str.lower):
        value = quote(params[key], safe="*")
        if java_tilde:
            # Java's URLEncoder encodes "~"; Python's quote never does.
            value = value.replace("~", "%7E")
        parts.append(f"{key}={value}")
    return "&".join(parts).lower()


def sign(params: Mapping[str, str], secret: str) -> str:
    """The base64 HMAC-SHA1 signature of ``params`` (as a client computes it)."""
    digest = hmac.new(
        secret.encode("utf-8"), string_to_sign(params).encode("utf-8"), hashlib.sha1
    ).digest()
    return base64.b64encode(digest).decode("ascii")


def format_time(seconds: float) -> str:
    """CloudStack's date format: ``2026-11-27T10:00:00+0000``."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def signed_query(
    params: Mapping[str, str], api_key: str, secret: str, now: float, ttl: float = 300
) -> dict[str, str]:
    """``params`` with ``apiKey``, ``response=json``, ``signatureVersion=3``, an ``expires``
    ``ttl`` seconds after ``now`` and the ``signature``: ready to send."""
    query = {
        "response": "json",
        **params,
        "apiKey": api_key,
        "signatureVersion": "3",
        "expires": format_time(now + ttl),
    }
    query["signature"] = sign(query, secret)
    return query
