"""Who may make a proxy API call, decided in the call's own database transaction: the
proxy key (known, not revoked), its allowed source networks, and the one-running-cpvm-per-
key rule. A refused key raises :class:`ProxyUnauthorized` or :class:`ProxyForbidden`,
which roll the transaction back; the proxy API answers them 401 and 403.
"""

from __future__ import annotations

import hmac
from typing import Any

from cpvm.manager import instances, store
from cpvm.manager.proxy_policy import ProxyPolicy


class ProxyUnauthorized(Exception):
    """The proxy key is malformed, unknown or revoked (HTTP 401)."""


class ProxyForbidden(Exception):
    """The key is valid but the call comes from outside its allowed networks (HTTP 403)."""


def proxy_key_policy(tx: Any, parsed: tuple[str, str]) -> ProxyPolicy | None:
    """The limits of the active proxy the parsed key belongs to, or None when it is unknown
    or revoked (constant-time hash comparison)."""
    record = store.proxy_key_record(tx, parsed[0])
    if record is None or not hmac.compare_digest(record[0].encode(), parsed[1].encode()):
        return None
    return record[1]


def admit_proxy(tx: Any, key: tuple[str, str], peer: str | None) -> ProxyPolicy:
    """In the request's transaction: the :class:`ProxyPolicy` of the parsed ``key`` when
    the call may go on; raises :class:`ProxyUnauthorized` or :class:`ProxyForbidden`
    otherwise."""
    policy = proxy_key_policy(tx, key)
    if policy is None:
        raise ProxyUnauthorized()
    if not policy.admits(peer):
        raise ProxyForbidden()
    return policy


def check_instance(
    tx: Any,
    proxy_id: str,
    caller: str | None,
    address: str | None,
    now: float,
    timeout: float,
    *,
    heartbeat: bool,
) -> instances.InstanceEvent | None:
    """Apply the one-instance-per-key rule in the caller's transaction: a
    :class:`~cpvm.manager.instances.InstanceEvent` (recorded; ``refused`` false for a takeover)
    or None. A heartbeat renews its instance's binding, or takes over the key of a silent
    instance; a redemption only binds a key nobody held (it leaves takeovers to the
    heartbeat, which logs them). Redemptions take no lock: they must not queue behind
    each other on the proxy's row (PostgreSQL)."""
    binding = store.instance_binding(tx, proxy_id, lock=heartbeat)
    if binding is None:
        return None
    decision = instances.decide(binding.instance_id, binding.seen_at, caller, now, timeout)
    if decision.accepted and caller is not None and decision.bind:
        if heartbeat:
            store.bind_instance(tx, proxy_id, caller, address, now)
            if decision.takeover:
                return instances.InstanceEvent(binding, caller, address, now, refused=False)
        elif binding.instance_id is None and not store.claim_instance(
            tx, proxy_id, caller, address, now
        ):
            # Another instance bound the key since we read it: decide again on that.
            binding = store.instance_binding(tx, proxy_id, lock=False) or binding
            decision = instances.decide(binding.instance_id, binding.seen_at, caller, now, timeout)
    if not decision.accepted:
        store.refuse_instance(tx, proxy_id, caller, address, now)
        return instances.InstanceEvent(binding, caller, address, now)
    return None
