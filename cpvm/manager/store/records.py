"""The rows the store hands back, as small frozen dataclasses, and the column lists and
readers that build them (shared by the store's modules)."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("admin", "user")
VM_STATES = ("Running", "Stopped")


class NotFound(Exception):
    """The named record does not exist."""


class Conflict(Exception):
    """The record already exists."""


@dataclass(frozen=True)
class Account:
    """An account: its role decides which VMs it may open consoles to."""

    id: str
    name: str
    role: str
    created_at: float
    disabled: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Caller:
    """An authenticated API caller: the account plus its (encrypted) secret."""

    account: Account
    secret_enc: str


@dataclass(frozen=True)
class Vm:
    """A registered VM with its owner's name and how to reach its VNC server."""

    id: str
    name: str
    owner_id: str
    owner_name: str
    state: str
    vnc_host: str
    vnc_port: int
    vnc_password_enc: str | None
    vnc_tls: str
    vnc_ca_pem: str | None
    vnc_server_name: str | None
    #: shared, exclusive or takeover; None follows the manager's default.
    viewer_policy: str | None = None


@dataclass(frozen=True)
class Proxy:
    """A proxy key and what its last heartbeat said."""

    id: str
    name: str
    created_at: float
    revoked_at: float | None
    public_host: str | None
    public_port: int | None
    tls: bool
    address: str | None
    capacity: int | None
    active_count: int
    version: str | None
    last_heartbeat: float | None


@dataclass(frozen=True)
class ProxyLoad:
    """A live proxy as the selection sees it."""

    proxy: Proxy
    pending: int  # tokens issued for it, not yet redeemed, not expired
    vm_sessions: int  # live or pending sessions of the requested VM there
    live: int = 0  # redeemed sessions there that have not ended, as this database knows

    @property
    def load(self) -> int:
        # A cpvm with several worker processes heartbeats once per worker, each with its
        # own sessions: the database's count of live sessions is the whole truth there.
        return max(self.proxy.active_count, self.live) + self.pending

    @property
    def capacity(self) -> int:
        return self.proxy.capacity or 0


@dataclass(frozen=True)
class SessionRecord:
    """A console session's record: issued, redeemed, ended (never its token)."""

    id: str
    created_at: float
    account_id: str
    account_name: str
    vm_id: str
    vm_name: str
    proxy_id: str
    proxy_name: str | None
    creator_address: str | None
    acquired_at: float | None
    client_address: str | None
    ended_at: float | None
    end_reason: str | None
    bytes_to_client: int | None
    bytes_to_server: int | None
    duration: float | None
    terminate_requested_at: float | None
    expires_at: float
    view_only: bool = False


@dataclass(frozen=True)
class TokenRow:
    """What a redemption needs to decide, read in the redeeming transaction."""

    session_id: str
    proxy_id: str
    expires_at: float
    acquired_at: float | None
    ended_at: float | None
    extra_hash: str | None
    bound_address: str | None
    account_name: str
    vm_id: str
    vm: Vm | None
    # The token's account still exists, is not disabled, and is an admin or still owns
    # the VM: read in the redeeming transaction, so a change made after the token was
    # issued counts.
    account_ok: bool = True
    # A view-only console (createConsoleEndpoint viewonly=true).
    view_only: bool = False


@dataclass(frozen=True)
class CleanupResult:
    """What one cleanup pass did."""

    lost: list[SessionRecord]
    expired: int
    purged_tokens: int
    deleted: int


ACCOUNT_COLS = "id, name, role, created_at, disabled"


def account_from_row(row: tuple) -> Account:
    """An :class:`Account` from the columns of ``ACCOUNT_COLS``."""
    return Account(row[0], row[1], row[2], row[3], bool(row[4]))


# A VM joined with its owner (``vms v JOIN accounts a``): the fields of Vm, in order.
VM_COLS = (
    "v.id, v.name, v.owner_id, a.name, v.state, v.vnc_host, v.vnc_port, v.vnc_password_enc, "
    "v.vnc_tls, v.vnc_ca_pem, v.vnc_server_name, v.viewer_policy"
)
VM_FIELDS = VM_COLS.count(",") + 1


def vm_from_row(row: tuple) -> Vm:
    """A :class:`Vm` from the columns of ``VM_COLS``."""
    return Vm(*row)


PROXY_COLS = (
    "id, name, created_at, revoked_at, public_host, public_port, tls, address, capacity, "
    "active_count, version, last_heartbeat"
)


def proxy_from_row(row: tuple) -> Proxy:
    """A :class:`Proxy` from the columns of ``PROXY_COLS`` (``tls`` stored as 0/1)."""
    r = list(row)
    r[6] = bool(r[6])
    return Proxy(*r)


# A session with its proxy's name (``console_sessions s LEFT JOIN proxies p``).
SESSION_COLS = (
    "s.id, s.created_at, s.account_id, s.account_name, s.vm_id, s.vm_name, s.proxy_id, p.name, "
    "s.creator_address, s.acquired_at, s.client_address, s.ended_at, s.end_reason, "
    "s.bytes_to_client, s.bytes_to_server, s.duration, s.terminate_requested_at, s.expires_at, "
    "s.view_only"
)
