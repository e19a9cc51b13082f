"""The broker's pure decisions: which proxy serves a console, the URL a browser opens, the
checks of a redemption, the syntax of a proxy key.

No I/O and no clock: every input (rows already read, the time) is an argument, so each
rule is tested on its own (``tests/manager/test_selection_cleanup.py``,
``tests/manager/test_proxy_policy.py``, ``tests/unit/test_contract.py``).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from urllib.parse import quote

from cpvm.common.contract import WEBSOCKET_PATH
from cpvm.manager import store
from cpvm.manager.secrets_box import sha256_hex

NOVNC_PATH = "/resource/noVNC/vnc.html"


def console_host(public_host: str, address: str | None, url_domain: str | None) -> str:
    """The host name browsers use, after CloudStack's ``consoleproxy.url.domain`` rules.

    ``*.example.com`` with address 1.2.3.4 gives ``1-2-3-4.example.com``; a plain domain is
    used as is; no domain (or no usable address for a pattern) keeps the proxy's public host.
    """
    if not url_domain:
        return public_host
    if url_domain.startswith("*."):
        source = address or public_host
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            return public_host
        label = str(ip).replace(".", "-").replace(":", "-")
        return f"{label}.{url_domain[2:]}"
    return url_domain


def console_url(
    host: str, port: int, tls: bool, token: str, extra: str | None, view_only: bool = False
) -> str:
    """The stock-noVNC URL that opens ``ws[s]://host:port/websockify?token=…``;
    ``view_only`` adds noVNC's own ``view_only=1`` (cpvm enforces it regardless)."""
    path = f"{WEBSOCKET_PATH}?token={quote(token, safe='')}"
    if extra is not None:
        path += f"&extra={quote(extra, safe='')}"
    scheme = "https" if tls else "http"
    host_in_url = f"[{host}]" if ":" in host else host
    return (
        f"{scheme}://{host_in_url}:{port}{NOVNC_PATH}?autoconnect=true&reconnect=false"
        f"&host={quote(host, safe='')}&port={port}&encrypt={1 if tls else 0}"
        f"&path={quote(path, safe='')}&show_dot=true{'&view_only=1' if view_only else ''}"
    )


def choose_proxy(candidates: Sequence[store.ProxyLoad]) -> store.ProxyLoad | None:
    """Sticky first (a non-full proxy already serving this VM), else the least loaded.

    Full proxies (load >= capacity) are never chosen. Ties go to the smaller absolute load,
    then the proxy id, so the choice is deterministic.
    """
    open_ = [c for c in candidates if c.capacity > 0 and c.load < c.capacity]
    if not open_:
        return None
    sticky = [c for c in open_ if c.vm_sessions > 0]
    pool = sticky or open_
    return min(pool, key=lambda c: (c.load / c.capacity, c.load, c.proxy.id))


def check_redemption(
    row: store.TokenRow | None,
    *,
    proxy_id: str,
    extra_hash: str,
    client_address: str,
    now: float,
) -> str | None:
    """The contract's checks in order; returns the error code or None. Never writes."""
    if row is None:
        return "invalid_token"
    if row.proxy_id != proxy_id:
        return "wrong_proxy"
    if row.acquired_at is not None:
        return "token_used"
    if row.ended_at is not None or now > row.expires_at:
        return "expired_token"
    if not hmac.compare_digest((row.extra_hash or "").encode("ascii"), extra_hash.encode("ascii")):
        return "extra_mismatch"
    if row.bound_address is not None and not _same_address(row.bound_address, client_address):
        return "address_mismatch"
    if row.vm is None or row.vm.state != "Running":
        return "vm_unavailable"
    if not row.account_ok:
        return "account_unavailable"
    return None


def parse_proxy_key(key: str) -> tuple[str, str] | None:
    """(proxy id, SHA-256 of the secret) of a ``cpvmk_<id>.<secret>`` key, or None.

    Only the syntax: whether the key is known and not revoked is decided in the database,
    in the same transaction as the request it authorises
    (:func:`cpvm.manager.proxy_admission.admit_proxy`).
    """
    if not key.startswith("cpvmk_") or "." not in key:
        return None
    proxy_id, _, secret = key[len("cpvmk_") :].partition(".")
    if not proxy_id or not secret or len(key) > 512:
        return None
    return proxy_id, sha256_hex(secret)


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b
