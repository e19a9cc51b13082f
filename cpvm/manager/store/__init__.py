"""The manager's records and the transactions over them.

Every function takes a :class:`cpvm.manager.db.Tx` as its first argument and runs inside
one transaction, so the service (``Database.run``) and the admin CLI (``run_sync``) share
exactly the same SQL. Rows come back as small frozen dataclasses
(:mod:`~cpvm.manager.store.records`).

Callers use this package as one namespace (``store.heartbeat(tx, …)``); the SQL lives in
one module per subject: accounts and API keys, VMs, proxies, instance bindings, sessions
and tokens, spent signatures (replays), housekeeping.
"""

from cpvm.manager.store.accounts import (
    create_account,
    create_api_key,
    find_account,
    list_accounts,
    list_api_keys,
    lookup_caller,
    revoke_api_key,
    set_account_disabled,
)
from cpvm.manager.store.bindings import (
    bind_instance,
    claim_instance,
    instance_binding,
    list_bindings,
    refuse_instance,
)
from cpvm.manager.store.housekeeping import cleanup, reconcile
from cpvm.manager.store.proxies import (
    KEEP,
    create_proxy,
    heartbeat,
    list_proxies,
    live_proxies,
    proxy_key_record,
    proxy_policies,
    revoke_proxy,
    set_proxy_policy,
)
from cpvm.manager.store.records import (
    ROLES,
    VM_STATES,
    Account,
    Caller,
    CleanupResult,
    Conflict,
    NotFound,
    Proxy,
    ProxyLoad,
    SessionRecord,
    TokenRow,
    Vm,
)
from cpvm.manager.store.replays import forget_expired_signatures, spend_signature
from cpvm.manager.store.sessions import (
    end_session,
    get_session,
    insert_session,
    list_sessions,
    mark_acquired,
    request_terminate,
    token_row,
)
from cpvm.manager.store.vms import add_vm, get_vm, list_vms, remove_vm, update_vm

__all__ = [
    "KEEP",
    "ROLES",
    "VM_STATES",
    "Account",
    "Caller",
    "CleanupResult",
    "Conflict",
    "NotFound",
    "Proxy",
    "ProxyLoad",
    "SessionRecord",
    "TokenRow",
    "Vm",
    "add_vm",
    "bind_instance",
    "claim_instance",
    "cleanup",
    "create_account",
    "create_api_key",
    "create_proxy",
    "end_session",
    "find_account",
    "forget_expired_signatures",
    "get_session",
    "get_vm",
    "heartbeat",
    "insert_session",
    "instance_binding",
    "list_accounts",
    "list_api_keys",
    "list_bindings",
    "list_proxies",
    "list_sessions",
    "list_vms",
    "live_proxies",
    "lookup_caller",
    "mark_acquired",
    "proxy_key_record",
    "proxy_policies",
    "reconcile",
    "refuse_instance",
    "remove_vm",
    "request_terminate",
    "revoke_api_key",
    "revoke_proxy",
    "set_account_disabled",
    "set_proxy_policy",
    "spend_signature",
    "token_row",
    "update_vm",
]
