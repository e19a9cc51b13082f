"""CloudStack API request signatures (HMAC-SHA1, signature versions 1–3).

The string to sign and the client's side are :mod:`cpvm.common.signatures` (the probe signs
with it too); here is what only the manager does: verify and apply the expiry. Names are not
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
from datetime import datetime

from cpvm.common.signatures import format_time, sign, string_to_sign

__all__ = [
    "EXPIRY_REQUIRED",
    "ExpiryPolicy",
    "SignatureTimeError",
    "check_expiry",
    "format_time",
    "parse_expires",
    "sign",
    "string_to_sign",
    "verify",
]


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
