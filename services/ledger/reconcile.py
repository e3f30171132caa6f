"""The ledger's part of ``billing reconcile usage``: what became of each usage command, from the event store.

Every command gets a ``CommandReceipt`` (its id is the command's id): ``rejected`` with a reason code, or
``applied``. An applied ``usage.debit`` is recorded on the tenant's account as ``UsageDebited`` (a debit of 0 has
no postings, a negative one gives back) or, refused for lack of credit under a ``block`` overage policy, as
``UsageRejected`` with its reason. The account's stream is read once (as ``billing audit`` reads it, in pages,
never from the aggregate cache), receipts only for commands the stream does not answer.

``parked_refunds`` lists, from the same stream, the gateway refunds that came before the payment they give back
(``BillingAccount.RefundAwaitingPayment``: a checkout order's or another purchase's, or an invoice's payment, naming
the invoice) and were not applied with it: still waiting (the payment never came, or was rejected), or settled
``rejected`` when it came (the refund would be rejected after its payment too), with the reason. The money has left
at the gateway for each of them: finance reconciles them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from uuid import UUID

from billing_events.reconciliation import LedgerOutcome, UsageDebit
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import account_events
from billing_ledger.domain.receipt import CommandReceipt

USAGE_DEBITED = "BillingAccount.UsageDebited"
USAGE_REJECTED = "BillingAccount.UsageRejected"
REFUND_PARKED = "BillingAccount.RefundAwaitingPayment"
PARKED_REFUND_SETTLED = "BillingAccount.ParkedRefundSettled"
# Receipts read per statement.
RECEIPTS_PER_READ_MAX = 500


@dataclass
class AccountUsage:
    """One account's usage commands: the outcome of each (by command id) and the debits of usage in a window."""

    outcomes: dict[UUID, LedgerOutcome] = field(default_factory=dict)
    debits: list[UsageDebit] = field(default_factory=list)


def account_usage(app: LedgerApplication, tenant: str, since: datetime, until: datetime) -> AccountUsage:
    """Reads the tenant's account stream: every usage command's outcome, and the ``UsageDebited`` of usage at
    ``since <= at < until`` (rating sends the usage's own time as ``at``; a close, its period's last reading)."""
    usage = AccountUsage()
    for event in account_events(app, tenant):
        kind = type(event).__qualname__
        if kind == USAGE_DEBITED:
            usage.outcomes[event.command_id] = LedgerOutcome(event.command_id, "posted")
            if since <= event.at < until:
                cause = event.cause if isinstance(event.cause, dict) else {}
                event_ids = cause.get("event_ids") or []
                usage.debits.append(UsageDebit(
                    tenant, event.command_id, tuple(str(e) for e in event_ids), event.at, bool(cause.get("closed")),
                    int(event.amount), event.unit))
        elif kind == USAGE_REJECTED:
            usage.outcomes[event.command_id] = LedgerOutcome(event.command_id, "rejected", event.reason)
    return usage


def receipts(app: LedgerApplication, command_ids: Iterable[UUID]) -> dict[UUID, LedgerOutcome]:
    """The outcome the receipts of ``command_ids`` record (none: never applied). An ``applied`` receipt is given as
    ``applied_without_debit``: ask only for commands the account's stream has no usage event of."""
    wanted = sorted(set(command_ids))
    found: dict[UUID, LedgerOutcome] = {}
    for start in range(0, len(wanted), RECEIPTS_PER_READ_MAX):
        stored = app.reader.events_after({command_id: 0 for command_id in wanted[start:start + RECEIPTS_PER_READ_MAX]})
        for command_id, events in stored.items():
            receipt = app.mapper.to_domain_event(events[0])
            if not isinstance(receipt, CommandReceipt.Recorded):
                continue  # not a receipt: an aggregate with that id (never a command's)
            if receipt.outcome == "rejected":  # type: ignore[attr-defined]
                found[command_id] = LedgerOutcome(command_id, "rejected", receipt.reason)  # type: ignore[attr-defined]
            else:
                found[command_id] = LedgerOutcome(command_id, "applied_without_debit")
    return found


@dataclass(frozen=True)
class ParkedRefund:
    """A gateway refund recorded before its payment and not applied: ``awaiting_payment`` or ``rejected``."""

    tenant: str
    key: str  # "<gateway>/<refund reference>"
    order_id: str
    refunded_payment: str | None
    amount: str
    currency: str
    at: datetime  # when the gateway's refund was verified
    status: str  # awaiting_payment | rejected
    payment: str | None = None  # the payment that came (rejected)
    reason: str | None = None
    detail: str | None = None
    invoice_id: str | None = None  # the refund of an invoice's payment: that invoice (since session 13)


def parked_refunds(app: LedgerApplication, tenant: str) -> list[ParkedRefund]:
    """The tenant's gateway refunds that came before their payment and were not applied (see the module doc)."""
    found: dict[str, ParkedRefund] = {}
    for event in account_events(app, tenant):
        kind = type(event).__qualname__
        if kind == REFUND_PARKED:
            refund = event.refund["payload"]
            found[event.key] = ParkedRefund(tenant, event.key, event.order_id, event.refunded_payment,
                                            str(refund.get("amount")), str(refund.get("currency")), event.at,
                                            "awaiting_payment", invoice_id=getattr(event, "invoice", None))
        elif kind == PARKED_REFUND_SETTLED and event.key in found:
            parked = found.pop(event.key)
            if event.outcome != "applied":
                found[event.key] = replace(parked, status="rejected", payment=event.payment, reason=event.reason,
                                           detail=event.detail)
    return list(found.values())
