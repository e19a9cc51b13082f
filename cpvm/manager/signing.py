"""CloudStack API request signatures (HMAC-SHA1, signature versions 1–3).

The string to sign: every parameter except ``signature``, values URL-encoded like Java's
``URLEncoder`` with ``+`` written ``%20`` (Python: ``quote(value, safe="*")``), sorted by
key, joined as ``key=value`` with ``&``, then the whole string lower-cased. Names are not
encoded (as in CloudStack): :mod:`cpvm.manager.params` refuses every name that could make
the string ambiguous before a signature is checked.

:func:`check_expiry` applies ``[security] signature_expiry`` and ``max_request_lifetime``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
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


def verify(params: Mapping[str, str], secret: str, signature: str) -> bool:
    """Constant-time check of ``signature``; accepts Python- and Java-style encodings."""
    candidates = {string_to_sign(params), string_to_sign(params, java_tilde=True)}
    ok = False
    for text in candidates:
        expected = base64.b64encode(
            hmac.new(secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
        ).decode("ascii")
        ok |= hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace"))
    return ok


def parse_expires(value: str) -> float:
    """Seconds since the epoch of an ISO-8601 ``expires`` (``2026-11-27T10:00:00+0000``)."""
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+0000"
    for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"):
        try:
            return datetime.strptime(text, fmt).timestamp()
        except ValueError:
            continue
    raise ValueError(f"expires is not an ISO-8601 date with a time zone: {value!r}")


def format_time(seconds: float) -> str:
    """CloudStack's date format: ``2026-11-27T10:00:00+0000``."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


@dataclass(frozen=True)
class ExpiryPolicy:
    """``required``: refuse requests without ``signatureVersion=3`` + ``expires`` (a signed
    URL without an expiry is valid forever once leaked). ``max_lifetime``: the furthest
    ``expires`` may lie ahead, in seconds."""

    required: bool = True
    max_lifetime: float = 600.0


class SignatureTimeError(ValueError):
    """The request's signature version or ``expires`` is refused (errorcode 401)."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text


EXPIRY_REQUIRED = (
    "this API requires signatureVersion=3 and expires: requests without an expiry time are refused"
)


def check_expiry(lower: Mapping[str, str], now: float, policy: ExpiryPolicy) -> None:
    """Check ``signatureversion``/``expires`` of ``lower`` (parameters by lower-cased name)
    at ``now``; raise :class:`SignatureTimeError` with the errortext when refused."""
    version = lower.get("signatureversion")
    expires = lower.get("expires") or None
    if version not in (None, "1", "2", "3"):
        raise SignatureTimeError("unsupported signatureVersion")
    if version == "3" and expires is None:
        raise SignatureTimeError("signatureVersion=3 requires expires")
    if policy.required and (version != "3" or expires is None):
        raise SignatureTimeError(EXPIRY_REQUIRED)
    if expires is None:
        return  # signature_expiry = optional: a CloudStack v1 client
    try:
        deadline = parse_expires(expires)
    except ValueError:
        raise SignatureTimeError("expires is not an ISO-8601 date") from None
    if now > deadline:
        raise SignatureTimeError("request expired")
    if deadline - now > policy.max_lifetime:
        raise SignatureTimeError(
            f"expires is too far ahead: at most {policy.max_lifetime:g} s from now"
        )
