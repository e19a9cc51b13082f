"""Fuzz targets for the manager's request parsing: public API parameters and signatures,
and the JSON bodies cpvm sends to the proxy API (heartbeat, redeem, end report).

The adapters below are the only places that know which manager functions parse what, so a
parser that moves (e.g. name validation becoming a pure function) is repointed here.
"""

from __future__ import annotations

import io
import math
import uuid
from types import SimpleNamespace
from typing import Any

from twisted.web.http import parse_qs

from cpvm.manager import proxy_api, public_api, signing

SECRET = "fuzz-secret-ÄÖ"


# -- adapters ---------------------------------------------------------------------------


def api_params(query: bytes) -> dict[str, str]:
    """The parameters of a public API request with this query string, as the manager reads
    them (twisted.web's parsing, then PublicApiResource._params). Raises ApiError."""
    request = SimpleNamespace(args=parse_qs(query, 1), method=b"GET", uri=b"/client/api")
    return public_api.PublicApiResource._params(None, request)  # type: ignore[arg-type]


def _proxy_resource() -> proxy_api.ProxyApiResource:
    """A ProxyApiResource whose work coroutines return what validation handed them."""
    resource = proxy_api.ProxyApiResource(None, None)  # type: ignore[arg-type]

    async def captured(*args):
        return args

    resource._redeem_call = captured  # type: ignore[method-assign]
    resource._heartbeat_call = captured  # type: ignore[method-assign]
    resource._end_call = captured  # type: ignore[method-assign]
    return resource


def proxy_body(endpoint: str, raw: bytes, session_id: str = "") -> tuple:
    """Parse and validate a proxy API body as the manager does before any database work.

    Returns the arguments the endpoint's work coroutine gets. Raises proxy_api.ProxyApiError.
    """
    body = proxy_api._json_body(SimpleNamespace(content=io.BytesIO(raw)))  # type: ignore[arg-type]
    resource = _proxy_resource()
    if endpoint == "redeem":
        call = resource._redeem("key", body, "127.0.0.1")
    elif endpoint == "heartbeat":
        call = resource._heartbeat("key", body, "127.0.0.1")
    else:
        call = resource._end("key", session_id, body, "127.0.0.1")
    try:
        call.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("validation coroutine did not finish at once")


# -- targets ----------------------------------------------------------------------------


def api_signature(data: bytes) -> None:
    """Any query string: a clear 431 or parameters whose signature round-trips."""
    try:
        params = api_params(data)
    except public_api.ApiError as e:
        assert e.code == 431, e.code
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
    text = signing.string_to_sign(params)
    assert text == text.lower()
    if len({k.lower() for k in params}) == len(params):
        # Names that repeat case-insensitively sign differently by their order: refusing
        # them (431) is security finding 1's fix; until then, the order check covers the rest.
        assert text == signing.string_to_sign(dict(reversed(list(params.items()))))
    signature = signing.sign(params, SECRET)
    assert signing.verify(params, SECRET, signature)
    assert not signing.verify(params, SECRET + "x", signature)
    assert not signing.verify(params, SECRET, signature[:-2] + "x=")
    # A signature parameter itself never counts.
    assert signing.string_to_sign({**params, "Signature": "x"}) == signing.string_to_sign(
        {k: v for k, v in params.items() if k.lower() != "signature"}
    )
    for key, value in params.items():
        signing.verify(params, SECRET, value)  # any caller-chosen signature: no exception
        if key.lower() == "expires" or len(params) == 1:
            try:
                deadline = signing.parse_expires(value)
            except ValueError:
                continue
            assert math.isfinite(deadline)
        for check in (public_api._bool_param, public_api._uuid_param):
            try:
                check(key, value)
            except public_api.ApiError as e:
                assert e.code == 431


_ENDPOINTS = ("redeem", "heartbeat", "end")


def _check_end_report(report: dict[str, Any]) -> None:
    assert report["reason"] in proxy_api.END_REASONS
    assert math.isfinite(report["duration"]) and report["duration"] >= 0, report["duration"]
    for key in ("bytes_to_client", "bytes_to_server"):
        assert 0 <= report[key] <= 2**62
    assert report["client_address"] is None or 1 <= len(report["client_address"]) <= 100


def proxy_bodies(data: bytes) -> None:
    """Any body to any proxy endpoint: a 400 with a reason, or values within their ranges."""
    if not data:
        return
    endpoint = _ENDPOINTS[data[0] % 3]
    try:
        args = proxy_body(endpoint, data[1:], str(uuid.UUID(int=data[0])))
    except proxy_api.ProxyApiError as e:
        assert e.status == 400 and e.code == "bad_request" and e.message, vars(e)
        return
    if endpoint == "redeem":
        _, token, extra, address, worker, instance, peer = args
        assert instance is None or 1 <= len(instance) <= 64
        assert peer == "127.0.0.1"
        assert 1 <= len(token) <= 512 and 1 <= len(address) <= 100
        assert extra is None or (isinstance(extra, str) and extra)
        assert 0 <= worker <= proxy_api.MAX_WORKER
    elif endpoint == "heartbeat":
        _, beat, peer = args
        assert peer == "127.0.0.1" and beat["peer"] == peer
        assert 1 <= beat["public_port"] <= 65535 and 0 <= beat["capacity"] <= 10**7
        assert isinstance(beat["tls"], bool) and 0 <= beat["worker"] <= proxy_api.MAX_WORKER
        assert len(beat["ended"]) <= proxy_api.MAX_ENDED_PER_BEAT
        for session_id, report in beat["ended"]:
            assert str(uuid.UUID(session_id)) == session_id
            _check_end_report(report)
    else:
        _check_end_report(args[2])
