"""Which security type cpvm takes from a VNC server, and why it refuses the others.

``SecurityPolicy`` is the client handshake's choice, kept apart from the byte-level state
machine in :mod:`cpvm.rfb.client`: given the top-level security types (RFC 6143 7.1.2) or
the VeNCrypt subtypes a server offers, it picks the strongest one cpvm may use, or says in
one line why none will do (and whether that is an authentication failure or a mismatch).
"""

from __future__ import annotations

from dataclasses import dataclass

from cpvm.rfb.events import (
    _NEEDS_PASSWORD,
    _PREFERENCE,
    _VENCRYPT_ANONYMOUS_SUBTYPES,
    _VENCRYPT_TLS_SUBTYPES,
    SEC_NONE,
    SEC_VENCRYPT,
    SEC_VNC_AUTH,
    VENCRYPT_X509_NONE,
    VENCRYPT_X509_VNC,
    FailureKind,
)
from cpvm.rfb.machine import _security_name


@dataclass(frozen=True)
class SecurityPolicy:
    """What the client handshake may accept (see ``RfbClientHandshake`` for each flag)."""

    has_password: bool
    allow_anonymous_tls: bool = False
    allow_none: bool = True
    require_tls: bool = False
    allow_x509: bool = True

    # -- top-level security types

    def choose_top_level(self, offered: list[int]) -> int | None:
        """The security type to answer ``offered`` with, or ``None``."""
        if SEC_VENCRYPT in offered:
            # The subtypes are only listed after committing to VeNCrypt; take it when it is
            # on offer, as servers offering it expect to be reached that way.
            return SEC_VENCRYPT
        if self.require_tls:
            return None
        if SEC_VNC_AUTH in offered and self.has_password:
            return SEC_VNC_AUTH
        if SEC_NONE in offered and self.allow_none:
            return SEC_NONE
        return None

    def top_level_refusal(self, offered: list[int], what: str) -> tuple[FailureKind, str]:
        """Why none of ``offered`` will do; ``what`` says how the server put them."""
        reasons = self._top_level_reasons(offered)
        kind: FailureKind = "unsupported-security"
        if reasons and all("needs a VNC password" in r for r in reasons):
            kind = "auth"  # the server is fine; cpvm lacks the password it demands
        if len(offered) == 1 and what.endswith("requires"):
            message = f"{what} security type {offered[0]} but it is not allowed: "
        else:
            message = f"{what} {offered} but none is allowed: "
        return kind, message + "; ".join(reasons)

    def _top_level_reasons(self, offered: list[int]) -> list[str]:
        reasons = []
        if self.require_tls:
            reasons.append("TLS is required and VeNCrypt (19) is not offered")
        unsupported = sorted({t for t in offered if t not in _PREFERENCE})
        if SEC_VNC_AUTH in offered and not self.has_password:
            reasons.append(f"type {SEC_VNC_AUTH} (VNC Authentication) needs a VNC password")
        if SEC_NONE in offered and not self.allow_none:
            reasons.append(f"type {SEC_NONE} (None) is refused by allow_none=False")
        if unsupported:
            names = ", ".join(f"{t} ({_security_name(t)})" for t in unsupported)
            reasons.append(f"unsupported: {names}")
        return reasons

    # -- VeNCrypt subtypes

    def subtype_allowed(self, subtype: int) -> bool:
        """Whether cpvm may use VeNCrypt ``subtype``."""
        if subtype in (VENCRYPT_X509_NONE, VENCRYPT_X509_VNC) and not self.allow_x509:
            return False
        if self.require_tls and subtype not in _VENCRYPT_TLS_SUBTYPES:
            return False
        if subtype in _NEEDS_PASSWORD and not self.has_password:
            return False
        if subtype in _VENCRYPT_ANONYMOUS_SUBTYPES and not self.allow_anonymous_tls:
            return False
        if subtype == SEC_NONE and not self.allow_none:
            return False
        return subtype in _PREFERENCE

    def choose_subtype(self, offered: list[int]) -> int | None:
        """The strongest allowed subtype of ``offered``, or ``None``."""
        for candidate in _PREFERENCE:
            if candidate in offered and self.subtype_allowed(candidate):
                return candidate
        return None

    def subtype_refusal(self, offered: list[int]) -> tuple[FailureKind, str]:
        """Why none of the VeNCrypt subtypes ``offered`` will do."""
        reasons = []
        if self.require_tls and not any(
            t in _VENCRYPT_TLS_SUBTYPES and self.subtype_allowed(t) for t in offered
        ):
            reasons.append("TLS is required and no acceptable VeNCrypt TLS subtype is offered")
        anonymous = sorted({t for t in offered if t in _VENCRYPT_ANONYMOUS_SUBTYPES})
        need_password = sorted({t for t in offered if t in _NEEDS_PASSWORD})
        if anonymous and not self.allow_anonymous_tls:
            reasons.append(f"VeNCrypt subtypes {anonymous} need allow_anonymous_tls")
        if need_password and not self.has_password:
            reasons.append(f"VeNCrypt subtypes {need_password} need a VNC password")
        if SEC_NONE in offered and not self.allow_none:
            reasons.append(f"VeNCrypt subtype {SEC_NONE} (None) is refused by allow_none=False")
        unsupported = sorted({t for t in offered if t not in _PREFERENCE})
        if unsupported:
            names = ", ".join(f"{t} ({_security_name(t)})" for t in unsupported)
            reasons.append(f"unsupported VeNCrypt subtypes: {names}")
        kind: FailureKind = "unsupported-security"
        if reasons and all("need a VNC password" in r for r in reasons):
            kind = "auth"
        message = f"server offered security types [{SEC_VENCRYPT}] but none is allowed: "
        return kind, message + "; ".join(reasons)
