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

``rejected_refunds`` (since session 14) lists the gateway refunds the ledger rejected when they came (part of a
paid order, more than is left of it, an ambiguous one, one of another payment of an invoice, ...): nothing was
booked, but the money has left at the gateway too. Their receipts keep the notification and the rejection's detail
(``CommandReceipt.RejectedCommandKept``, for ``payment.refunded`` only), found by scanning the notification log for
that event (like the dispute receipts below). A refund rejected before session 14 kept no notification: it is not
listed (``billing reconcile usage`` and the receipts still count it).

``disputes`` (``billing reconcile disputes``, since session 13) gives, from the same stream, the tenant's disputes
still open (those whose funds the gateway withdrew and has not settled among them), the lost ones whose chargeback
waits for the payment it takes back (a ``RefundAwaitingPayment`` naming its dispute), and, from the ledger's
receipts, the dispute notifications rejected for reconciliation (a chargeback above what is left of an order, a
dispute lost then reported won, one of another payment of an invoice, ...): the command's id, kind, reason code and
time, so finance finds the gateway's event by its id (``ids.command_id(kind, gateway, gateway event id)``), and since
session 14 the reason in words and the dispute, order and amount it named. They are read from the tenant's
``DisputeRejections`` (``domain/dispute_rejections.py``), recorded with each rejection's receipt: the tenant's own
events, however many receipts the store holds. Session 13 found them by scanning every receipt of the store (every
command has one: a store of ten million usage debits was ten million receipts to read for one tenant); that scan is
left for rejections recorded before the index existed (``scan_receipts``, ``--scan-receipts``). It also lists what
gateways charged for each dispute (``fees``: the fee booked, ``DisputeFeeBooked``, and a fee in another currency
than the account's, which a person books).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.money import MoneyError, currency, format_subunits, from_subunits, is_currency_code
from billing_events.reconciliation import LedgerOutcome, UsageDebit
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import account_events
from billing_ledger.domain.dispute_rejections import dispute_rejections_id
from billing_ledger.domain.receipt import RECORDED_TOPIC as RECEIPT_RECORDED_TOPIC
from billing_ledger.domain.receipt import REJECTED_COMMAND_KEPT_TOPIC, CommandReceipt
from billing_ledger.payment_commands import PAYMENT_REFUNDED, parked_refund_key

USAGE_DEBITED = "BillingAccount.UsageDebited"
USAGE_REJECTED = "BillingAccount.UsageRejected"
REFUND_PARKED = "BillingAccount.RefundAwaitingPayment"
PARKED_REFUND_SETTLED = "BillingAccount.ParkedRefundSettled"
DISPUTE_RAISED = "BillingAccount.DisputeRaised"
DISPUTE_FUNDS_WITHDRAWN = "BillingAccount.DisputeFundsWithdrawn"
DISPUTE_FUNDS_REINSTATED = "BillingAccount.DisputeFundsReinstated"
DISPUTE_CLOSED = "BillingAccount.DisputeClosed"
DISPUTE_FEE_BOOKED = "BillingAccount.DisputeFeeBooked"
DISPUTE_MOVEMENTS = frozenset({DISPUTE_FUNDS_WITHDRAWN, DISPUTE_FUNDS_REINSTATED, DISPUTE_CLOSED, DISPUTE_FEE_BOOKED})
DISPUTE_REJECTED = "DisputeRejections.Rejected"
DISPUTE_COMMAND_PREFIX = "dispute."
# Receipts read per statement.
RECEIPTS_PER_READ_MAX = 500
# A tenant's recorded dispute rejections read per statement.
REJECTIONS_PER_READ_MAX = 500
# Receipt notifications read per statement when scanning the log for a tenant's rejected dispute commands
# (``--scan-receipts``: rejections recorded before session 14).
RECEIPTS_PER_SCAN_MAX = 5000


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
class UnappliedRefund:
    """A gateway refund the ledger did not apply: recorded before its payment and ``awaiting_payment`` it, or
    ``rejected`` (when its payment came, or when it came: then ``command_id`` names its rejected command)."""

    tenant: str
    key: str  # "<gateway>/<refund reference>" (a lost dispute's: "<gateway>/<dispute id>/lost")
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
    dispute: str | None = None  # a lost dispute's chargeback: its dispute id (since session 13)
    command_id: str | None = None  # rejected when it came: its command, whose receipt keeps it (since session 14)


def parked_refunds(app: LedgerApplication, tenant: str) -> list[UnappliedRefund]:
    """The tenant's gateway refunds that came before their payment and were not applied (see the module doc)."""
    found: dict[str, UnappliedRefund] = {}
    for event in account_events(app, tenant):
        kind = type(event).__qualname__
        if kind == REFUND_PARKED:
            refund = event.refund["payload"]
            found[event.key] = UnappliedRefund(tenant, event.key, event.order_id, event.refunded_payment,
                                               str(refund.get("amount")), str(refund.get("currency")), event.at,
                                               "awaiting_payment", invoice_id=getattr(event, "invoice", None),
                                               dispute=refund.get("dispute") or None)
        elif kind == PARKED_REFUND_SETTLED and event.key in found:
            parked = found.pop(event.key)
            if event.outcome != "applied":
                found[event.key] = replace(parked, status="rejected", payment=event.payment, reason=event.reason,
                                           detail=event.detail)
    return list(found.values())


def rejected_refunds(app: LedgerApplication, tenants: Iterable[str]) -> list[UnappliedRefund]:
    """The gateway refunds of ``tenants`` the ledger rejected when they came, oldest first, one per gateway refund
    (its first rejected notification), from their receipts (see the module doc: a scan of the notification log)."""
    wanted, position = set(tenants), 0
    found: dict[tuple[str, str], UnappliedRefund] = {}
    while True:
        page = app.recorder.select_notifications(position + 1, RECEIPTS_PER_SCAN_MAX,
                                                 topics=[REJECTED_COMMAND_KEPT_TOPIC])
        for notification in page:
            position = notification.id
            kept: Any = app.mapper.to_domain_event(notification)
            command = kept.command
            if command.get("kind") != PAYMENT_REFUNDED or command.get("tenant") not in wanted:
                continue
            refund = _rejected_refund(kept, command)
            found.setdefault((refund.tenant, refund.key), refund)
        if len(page) < RECEIPTS_PER_SCAN_MAX:
            return list(found.values())


def _rejected_refund(kept: Any, command: dict[str, Any]) -> UnappliedRefund:
    payload = command.get("payload") or {}
    gateway = str(payload.get("gateway"))
    reference = str(payload.get("gateway_reference") or payload.get("gateway_event_id"))
    verified = payload.get("verified_at") or command.get("issued_at")
    return UnappliedRefund(
        str(command["tenant"]), parked_refund_key(gateway, reference), str(payload.get("order_id")),
        payload.get("refunded_payment") or None, str(payload.get("amount")), str(payload.get("currency")),
        datetime.fromisoformat(verified) if isinstance(verified, str) else kept.timestamp, "rejected",
        reason=kept.reason, detail=kept.detail, invoice_id=payload.get("invoice_id") or None,
        dispute=payload.get("dispute") or None, command_id=str(kept.originator_id))


@dataclass(frozen=True)
class OpenDispute:
    """A dispute the gateway has not decided: ``withdrawn`` the funds it holds meanwhile (0: none withdrawn)."""

    tenant: str
    key: str  # "<gateway>/<dispute id>"
    order_id: str
    payment: str | None
    invoice_id: str | None
    amount: str  # disputed, in ``currency``
    withdrawn: str
    currency: str
    opened_at: datetime
    fee: str = "0"  # the gateway's fee booked for it so far (since session 14)


@dataclass(frozen=True)
class DisputeFee:
    """What a gateway charged for a dispute (since session 14): ``fee`` booked in ``dispute_fees`` (net of what it gave
    back), and ``unbooked`` a fee it stated in another currency than the account's, which a person books."""

    tenant: str
    key: str
    status: str  # open | won | lost | closed
    fee: str
    currency: str
    unbooked: str | None = None  # e.g. "15.00 EUR"


@dataclass(frozen=True)
class RejectedDisputeCommand:
    """A dispute notification the ledger rejected (changed nothing): its command, reason code and time, and (recorded
    since session 14) the reason in words and what it named."""

    tenant: str
    command_id: str
    kind: str
    reason: str | None
    at: datetime
    detail: str | None = None
    dispute: str | None = None
    order_id: str | None = None
    amount: str | None = None
    currency: str | None = None


@dataclass
class DisputesToReconcile:
    open: list[OpenDispute] = field(default_factory=list)
    awaiting_payment: list[UnappliedRefund] = field(default_factory=list)  # lost, the payment not booked yet
    rejected: list[RejectedDisputeCommand] = field(default_factory=list)
    fees: list[DisputeFee] = field(default_factory=list)  # every dispute a gateway charged a fee for

    @property
    def withdrawn(self) -> list[OpenDispute]:
        """The open disputes whose funds the gateway withdrew and has not settled yet."""
        return [d for d in self.open if Decimal(d.withdrawn) != 0]

    @property
    def unbooked_fees(self) -> list[DisputeFee]:
        """The fees a gateway stated in another currency than the account's: a person books them."""
        return [f for f in self.fees if f.unbooked]

    def fees_booked(self) -> dict[str, Decimal]:
        """The fees booked in all, per currency."""
        totals: dict[str, Decimal] = {}
        for f in self.fees:
            totals[f.currency] = totals.get(f.currency, Decimal(0)) + Decimal(f.fee)
        return {code: total for code, total in sorted(totals.items()) if total}


def _money(unit: str, subunits: int) -> str:
    """``subunits`` of ``unit`` as its customers read it (a currency with its minor unit's decimals)."""
    try:
        if is_currency_code(unit):
            return format_subunits(subunits, currency(unit))
    except MoneyError:
        pass
    return format(from_subunits(subunits).normalize(), "f")


def _account_disputes(app: LedgerApplication, tenant: str) -> tuple[list[OpenDispute], list[DisputeFee]]:
    """The tenant's disputes not closed yet and those a gateway charged a fee for, from its account's stream (oldest
    first)."""
    found: dict[str, dict[str, Any]] = {}
    for event in account_events(app, tenant):
        kind = type(event).__qualname__
        if kind == DISPUTE_RAISED:
            found[event.key] = {"order_id": event.order_id, "payment": event.payment, "invoice": event.invoice,
                                "unit": event.unit, "amount": event.amount, "at": event.at, "withdrawn": 0,
                                "status": "open", "fee": 0, "unbooked": None}
            continue
        d = found.get(event.key) if kind in DISPUTE_MOVEMENTS else None
        if d is None:
            continue
        if kind == DISPUTE_FUNDS_WITHDRAWN:
            d["withdrawn"] = event.amount
        elif kind == DISPUTE_FUNDS_REINSTATED:
            d["withdrawn"] = 0
        elif kind == DISPUTE_CLOSED:
            d.update(status=event.outcome, withdrawn=0)
        elif getattr(event, "unbooked", False):  # a fee in another currency: listed for a person
            d["unbooked"] = f"{_money(event.unit, event.fee)} {event.unit}" if event.fee else None
        else:
            d["fee"] = event.fee
    opened = [OpenDispute(tenant, key, d["order_id"], d["payment"], d["invoice"], _money(d["unit"], d["amount"]),
                          _money(d["unit"], d["withdrawn"]), d["unit"], d["at"], _money(d["unit"], d["fee"]))
              for key, d in found.items() if d["status"] == "open"]
    fees = [DisputeFee(tenant, key, d["status"], _money(d["unit"], d["fee"]), d["unit"], d["unbooked"])
            for key, d in found.items() if d["fee"] or d["unbooked"]]
    return opened, fees


def open_disputes(app: LedgerApplication, tenant: str) -> list[OpenDispute]:
    """The tenant's disputes not closed yet, from its account's stream (oldest first)."""
    return _account_disputes(app, tenant)[0]


def rejected_dispute_commands(app: LedgerApplication, tenants: Iterable[str]) -> list[RejectedDisputeCommand]:
    """The dispute commands of ``tenants`` the ledger rejected, oldest first per tenant, from each tenant's
    ``DisputeRejections`` (see the module doc): its own events, in pages of ``REJECTIONS_PER_READ_MAX``."""
    found: list[RejectedDisputeCommand] = []
    for tenant in tenants:
        index, last = dispute_rejections_id(tenant), 0
        while True:
            page = list(app.events.get(index, gt=last or None, limit=REJECTIONS_PER_READ_MAX))
            for event in page:
                last = event.originator_version
                if type(event).__qualname__ != DISPUTE_REJECTED:
                    continue
                found.append(RejectedDisputeCommand(tenant, str(event.command_id), event.kind, event.reason, event.at,
                                                    event.detail, event.dispute, event.order_id, event.amount,
                                                    event.currency))
            if len(page) < REJECTIONS_PER_READ_MAX:
                break
    return found


def scanned_rejected_dispute_commands(app: LedgerApplication,
                                      tenants: Iterable[str]) -> list[RejectedDisputeCommand]:
    """The same from the receipts themselves, for rejections recorded before ``DisputeRejections`` existed (session
    13's store): a scan of every receipt in the notification log (an offline read, pages of
    ``RECEIPTS_PER_SCAN_MAX``), ``billing reconcile disputes --scan-receipts``."""
    wanted, found, position = set(tenants), [], 0
    while True:
        page = app.recorder.select_notifications(position + 1, RECEIPTS_PER_SCAN_MAX, topics=[RECEIPT_RECORDED_TOPIC])
        for notification in page:
            position = notification.id
            # Receipts are stored as plain JSON (``CommandReceipt.recorded_state``): look before decoding.
            state = bytes(notification.state)
            if b'"dispute.' not in state or b'"rejected"' not in state:
                continue
            receipt: Any = app.mapper.to_domain_event(notification)
            if receipt.tenant in wanted and receipt.outcome == "rejected" \
                    and str(receipt.kind).startswith(DISPUTE_COMMAND_PREFIX):
                found.append(RejectedDisputeCommand(receipt.tenant, str(receipt.command_id), receipt.kind,
                                                    receipt.reason, receipt.timestamp))
        if len(page) < RECEIPTS_PER_SCAN_MAX:
            return found


def disputes(app: LedgerApplication, tenants: Iterable[str], *, scan_receipts: bool = False) -> DisputesToReconcile:
    """What finance reconciles of ``tenants``' disputes (see the module doc). ``scan_receipts``: the rejected ones from
    every receipt in the store as well (rejections recorded before session 14), each listed once."""
    names = list(dict.fromkeys(tenants))
    result = DisputesToReconcile(rejected=rejected_dispute_commands(app, names))
    if scan_receipts:
        indexed = {r.command_id for r in result.rejected}
        result.rejected += [r for r in scanned_rejected_dispute_commands(app, names) if r.command_id not in indexed]
    for tenant in names:
        opened, fees = _account_disputes(app, tenant)
        result.open += opened
        result.fees += fees
        result.awaiting_payment += [p for p in parked_refunds(app, tenant) if p.dispute]
    return result
