"""CloudStack API request signing for tests and benchmarks: the one place they sign.

Every harness that calls the manager's public API (the in-memory one, the in-process one,
the real process, the packaged stack, the benchmarks) builds its signed parameters here, as
any CloudStack API client would: the manager's own ``cpvm.manager.signing`` computes the
HMAC-SHA1, so a change to the signature scheme shows up in one test helper, not five.
"""

from __future__ import annotations

from collections.abc import Mapping

from cpvm.manager.signing import format_time, sign

#: How far ahead a test request expires unless it says otherwise (within the manager's
#: default ``max_request_lifetime``).
DEFAULT_TTL = 300.0


def signed_query(
    params: Mapping[str, str], api_key: str, secret: str, *, expires_at: float | None
) -> dict[str, str]:
    """``params`` as a signed public API request.

    ``apiKey`` is added unless ``params`` has one. With ``expires_at`` (seconds since the
    epoch, on whichever clock the manager under test reads) the request is signature
    version 3 expiring then, unless ``params`` already says ``signatureVersion`` or
    ``expires``; ``None`` signs as a version 1 client (no expiry). A ``signature`` already
    in ``params`` is kept as it is (tests of forged or stale signatures).
    """
    query = dict(params)
    query.setdefault("apiKey", api_key)
    if "signature" in query:
        return query
    if expires_at is not None and "signatureVersion" not in query and "expires" not in query:
        query["signatureVersion"] = "3"
        query["expires"] = format_time(expires_at)
    query["signature"] = sign(query, secret)
    return query
