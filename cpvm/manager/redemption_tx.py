"""The redemption's transaction: the proxy's key and instance, the token's checks, a resume
after an unclean end (:mod:`cpvm.manager.resume`), the VM's viewer policy
(:mod:`cpvm.manager.viewers`) and the single-use write, in that order, in one transaction.

:func:`redeem_in` runs inside ``Database.run``; :class:`~cpvm.manager.proxy_broker.ProxyBroker`
turns its result into metrics, log lines and the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpvm.manager import resume_store, store, viewers
from cpvm.manager.decisions import check_redemption
from cpvm.manager.proxy_admission import admit_proxy, check_instance
from cpvm.manager.resume import Verdict
from cpvm.manager.store import recordings as recording_store

if TYPE_CHECKING:
    from cpvm.manager.consoles import BrokerSettings


@dataclass(frozen=True)
class Redeemed:
    """A redemption that won: the token's row, the viewer policy's decision, the sessions
    it took over, and for a resume its new reconnect count."""

    row: store.TokenRow
    decision: viewers.ViewerDecision
    taken_over: list[str]
    resumed: resume_store.Resumed | None = None
    # Whether the session is recorded (cpvm.manager.recording_policy; a resume keeps it).
    recorded: bool = False


def redeem_in(
    tx: Any,
    settings: BrokerSettings,
    key: tuple[str, str],
    token_hash: str,
    extra_hash: str,
    client_address: str,
    caller: tuple[int, str | None],
    instance: str | None,
    peer: str | None,
    now: float,
) -> tuple[str | None, Any, Any]:
    """``(None, Redeemed, None)``, or ``(error, token row or instance event, why not
    resumed or None)``; ``caller``: the proxy's worker process and the browser's cookie
    hash."""
    proxy_id = key[0]
    worker, browser_hash = caller
    admit_proxy(tx, key, peer)
    # Before the token is looked at: a refused instance consumes nothing.
    refusal = check_instance(
        tx, proxy_id, instance, peer, now, settings.proxy_timeout, heartbeat=False
    )
    if refusal is not None and refusal.refused:
        return "instance_conflict", refusal, None
    row = store.token_row(tx, token_hash)
    error = check_redemption(
        row, proxy_id=proxy_id, extra_hash=extra_hash, client_address=client_address, now=now
    )
    facts = verdict = None
    if error == "token_used" and settings.reconnect_window > 0:
        assert row is not None
        error, facts, verdict = resume_store.resume_verdict(
            tx,
            row,
            proxy_id=proxy_id,
            extra_hash=extra_hash,
            browser_hash=browser_hash,
            client_address=client_address,
            now=now,
            window=settings.reconnect_window,
            max_duration=settings.max_duration,
        )
    if error is not None:
        return error, row, verdict
    assert row is not None
    return _take(tx, settings, row, (facts, verdict), client_address, caller, now)


def _take(
    tx: Any,
    settings: BrokerSettings,
    row: store.TokenRow,
    resume: tuple[resume_store.ResumeFacts | None, Verdict | None],
    client_address: str,
    caller: tuple[int, str | None],
    now: float,
) -> tuple[str | None, Any, Any]:
    """The token passed its checks: the viewer policy, then the one conditional write that
    makes it this redemption's (a first use, or a resume's reopening), then a takeover."""
    worker, browser_hash = caller
    facts, verdict = resume
    assert row.vm is not None
    # The VM's viewer policy, atomic with the single use (viewers.py locks the VM's row on
    # PostgreSQL when the policy is not shared); a refusal spends nothing. A resume is
    # held to it too: the console may have been taken by someone else meanwhile.
    decision = viewers.check(
        tx, row.vm_id, row.session_id, row.view_only, row.vm.viewer_policy, settings.viewer_policy
    )
    if decision.error is not None:
        return decision.error, row, None
    resumed = None
    if facts is not None and verdict is not None:
        outcome = resume_store.reopen(
            tx, row.session_id, facts, verdict, client_address, worker, now
        )
        if not isinstance(outcome, resume_store.Resumed):
            return "token_used", row, outcome
        resumed = outcome
    # Validated in this transaction; the conditional UPDATE decides who wins.
    elif not store.mark_acquired(tx, row.session_id, client_address, now, worker, browser_hash):
        return "token_used", row, None
    taken_over = viewers.take_over(tx, decision, row.vm_id, row.session_id, now)
    recorded = recording_store.decide(
        tx, row.session_id, settings.record_default, resumed=resumed is not None
    )
    return None, Redeemed(row, decision, taken_over, resumed, recorded), None
