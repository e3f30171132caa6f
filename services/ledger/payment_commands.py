"""Verified payments from ``billing.payments``: purchased credit and gateway refunds, exactly once.

Each ``PaymentNotification`` becomes a ledger command whose id derives from the gateway and its event id
(``payment.succeeded`` / ``payment.refunded``), applied in the same batch transaction as the Kafka position
and refused as a duplicate the second time, like every other command.

* A payment for an account that does not exist yet (its ``account.open`` travels on the other topic) fails
  its batch, which the consumer retries, for ``PAYMENT_ACCOUNT_WAIT_SECONDS`` after the gateway verified
  it; only then is it rejected (``unknown_account``, recorded on its receipt for reconciliation).
* ``payment_succeeded`` for an invoice (the notification's ``invoice_id``, written by dunning's off-session
  charges; or, for payments made before that key existed, an ``order_id`` that names one of the tenant's
  invoices) settles that invoice (``invoice.mark_paid``'s idempotent path: dunning usually marked it paid
  already) and grants nothing: the money paid the invoice. A payment that does not match the invoice (amount,
  currency, a void or draft invoice, an unknown invoice id) is rejected with its reason and recorded for
  reconciliation, never turned into credit.
* ``payment_succeeded`` for a checkout order pays the order (``checkout_commands.pay_order``).
* any other ``payment_succeeded`` grants the notified amount as purchased credit (source ``purchase``, in the
  account's currency, no expiry) with a grant id derived from the gateway event, so even a command with
  another id could not grant it twice. Packages, tax and orders belong to another part of the system.
* ``refund_succeeded`` books a refund the gateway has *already paid out*: it is a fact, not a request, so
  it is recorded even when the credit was spent (with the override: the spent part is reversed from
  revenue, see ``BillingAccount.refund_grant``). It refunds the purchase grants of the same order; a checkout
  order is reversed when the refund is exactly what is left of it (``refund_request_commands.gateway_refunded``).
* ``refund_succeeded`` before the payment it gives back (the gateway's notifications crossed: a checkout order not
  paid yet, or an order none of whose purchase is booked) waits on the account (``_park_refund``,
  ``RefundAwaitingPayment``, once per gateway refund reference); that order's ``payment_succeeded`` applies it in
  the same command, exactly as a refund after it, or settles it rejected with the reason such a refund would get
  (``_apply_parked_refunds``). Either order ends the same; ``reconcile.parked_refunds`` lists those not applied.
* a ``refund_succeeded`` the ledger rejects (part of an order, more than is left of it, of another payment, ...)
  books nothing, but the money has left at the gateway: its receipt keeps the notification and the rejection's
  detail (``handles(..., keep_rejected=True)``), and ``reconcile.rejected_refunds`` (``billing reconcile refunds``)
  lists it with its reason for finance to reconcile by hand.
* ``refund_succeeded`` of an invoice's payment before that payment (the invoice finalized, not paid yet) waits on
  the account the same way, naming the invoice (since session 13; it was rejected ``invoice_refund_mismatch``);
  whatever pays the invoice (its ``payment_succeeded``, or ``invoice.mark_paid``: dunning's charge, a payment
  booked by hand) applies it in the same command (``apply_parked_invoice_refunds``): the same credit note, books,
  tax and invoice state as a refund after the payment, or settled rejected with that refund's reason.
* ``refund_succeeded`` of a payment that settled an invoice (the notification's ``invoice_id``, or an
  ``order_id`` naming one of the tenant's invoices, as for payments) is recorded against that invoice, never
  as a purchase reversal: a credit note (``CN-``, ``related_invoice``) for the refunded amount, tax
  included -- the invoice's lines negated for a full refund, else one ``adjustment`` line and its ``tax`` line
  in the invoice's proportion of tax. A full refund gives back all the invoice's payment paid: of an invoice paid
  less than its total (12.957 KWD charged 12.950, ``Invoice.written_off``) 12.950, whose note also shows the 0.007
  never paid (``_written_off_line``), as does the last of several refunds that give all of it back. The invoice
  itself stays ``paid`` (as Stripe's invoices do): it was
  paid, the credit note says what came back. One credit note per gateway refund (``refund_credit_note_key``);
  the gateway never refunds more than was paid, and a single refund above the invoice's total, in another
  currency or of an invoice that is not paid is rejected for reconciliation. So is the refund of a payment
  that did not pay it (``refund_of_other_payment``: the notification's ``refunded_payment`` is not the
  invoice's ``payment``, e.g. a second payment rejected ``invoice_already_paid``; see
  ``_refund_of_other_payment`` for a notification that names none): its revenue and tax stay.
* ``payment_failed`` of a charge dunning recorded pending (``invoice.payment_pending`` keeps its reference on
  the invoice) records that attempt's failure on the invoice (``Invoice.PaymentFailed``); dunning's next round
  treats it like a declined attempt (email, ``invoice.payment_failed``, past_due after the last one) and
  retries on its schedule. A failure of any other charge of the invoice (a decline dunning saw when it
  charged) or of a closed invoice changes nothing.
* ``dispute_*`` (a card dispute: opened, funds withdrawn or reinstated, closed) is ``dispute_commands``'; a lost
  dispute's chargeback is booked by ``_refund`` here, as a refund the gateway paid out, its events' cause naming the
  dispute (``dispute_cause``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_events.money import RATING_CONTEXT, currency, from_subunits, parse_decimal, round_minor
from billing_ledger import checkout_commands, payload, refund_request_commands
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, _snake, handles
from billing_ledger.domain.account import BillingAccount, LedgerError, TooManyParkedRefunds
from billing_ledger.domain.checkout import PAID as ORDER_PAID
from billing_ledger.domain.checkout import REFUNDED as ORDER_REFUNDED
from billing_ledger.domain.invoice import (
    CREDIT_NOTE,
    FINALIZED,
    INVOICE,
    PAID,
    Invoice,
    InvoiceError,
    invoice_id,
    line,
    reversing_lines,
)
from billing_ledger.invoice_commands import paid_amount, settle_invoice, tenant_invoice
from billing_ledger.invoice_overage import repay_from_purchase
from billing_ledger.subscription_commands import _finalize

# A payment for an account not opened yet is retried for this long before it is rejected (and recorded).
PAYMENT_ACCOUNT_WAIT_SECONDS = 600
PAYMENT_SUCCEEDED = "payment.succeeded"
PAYMENT_REFUNDED = "payment.refunded"
PAYMENT_FAILED = "payment.failed"
# A dispute's movements (``dispute_commands``).
DISPUTE_OPENED = "dispute.opened"
DISPUTE_FUNDS_WITHDRAWN = "dispute.funds_withdrawn"
DISPUTE_FUNDS_REINSTATED = "dispute.funds_reinstated"
DISPUTE_CLOSED = "dispute.closed"
KINDS = {"payment_succeeded": PAYMENT_SUCCEEDED, "refund_succeeded": PAYMENT_REFUNDED,
         "payment_failed": PAYMENT_FAILED, "dispute_opened": DISPUTE_OPENED,
         "dispute_funds_withdrawn": DISPUTE_FUNDS_WITHDRAWN, "dispute_funds_reinstated": DISPUTE_FUNDS_REINSTATED,
         "dispute_closed": DISPUTE_CLOSED}


def payment_grant_id(tenant: str, gateway: str, gateway_event_id: str) -> UUID:
    return ids.grant_id(tenant, f"payment/{gateway}/{gateway_event_id}")


def payment_command(notification: PaymentNotification) -> LedgerCommand:
    """The ledger command for a verified notification; the same notification always gives the same id."""
    kind = KINDS[notification.kind]
    return LedgerCommand(
        command_id=ids.command_id(kind, notification.gateway, notification.gateway_event_id),
        kind=kind, tenant=notification.tenant, issued_at=notification.verified_at,
        issued_by=f"gateway:{notification.gateway}",
        payload={"gateway": notification.gateway, "gateway_event_id": notification.gateway_event_id,
                 "order_id": notification.order_id, "amount": str(notification.amount),
                 "currency": notification.currency, "verified_at": notification.verified_at.isoformat(),
                 "gateway_reference": notification.gateway_reference, "invoice_id": notification.invoice_id,
                 "refunded_payment": notification.refunded_payment,
                 # A dispute names its dispute and outcome; the payment it disputes is the one a lost dispute gives
                 # back, read by the refund it is booked as (``_refund``, a parked refund) as ``refunded_payment``.
                 **({"dispute": notification.dispute, "dispute_outcome": notification.dispute_outcome,
                     "refunded_payment": notification.disputed_payment} if notification.dispute else {}),
                 # The gateway's fee for the dispute as its API showed it (since session 14; absent: none stated).
                 **({"dispute_fee": str(notification.dispute_fee),
                     "dispute_fee_currency": notification.dispute_fee_currency}
                    if notification.dispute_fee is not None else {})},
    )


class AccountNotYetOpen(Exception):
    """Not a rejection: the batch fails and the consumer retries it (with back-off) until the account exists."""


def _account_in_currency(batch: _Batch, command: LedgerCommand) -> BillingAccount:
    try:
        account = account_of(batch, command.tenant)
    except CommandRejected as exc:
        # Money received must never be dropped because the account's opening command (another topic) has
        # not been applied yet: wait for it, for a bounded time, then reject it with its reason (recorded).
        waited = datetime.now(UTC) - payload.timestamp(command, "verified_at")
        if exc.reason == "unknown_account" and waited < timedelta(seconds=PAYMENT_ACCOUNT_WAIT_SECONDS):
            raise AccountNotYetOpen(f"payment for {command.tenant!r} before its account exists") from exc
        raise
    currency = payload.text(command, "currency")
    if currency != account.currency:
        raise CommandRejected("currency_mismatch",
                              f"payment in {currency} for an account in {account.currency}")
    return account


@handles(PAYMENT_SUCCEEDED)
def grant_purchase(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    gateway, event_id = payload.text(command, "gateway"), payload.text(command, "gateway_event_id")
    named_invoice = command.payload.get("invoice_id")
    invoice = tenant_invoice(batch, command.tenant, named_invoice or command.payload.get("order_id"))
    if named_invoice and invoice is None:
        raise CommandRejected("unknown_invoice", f"payment for invoice {named_invoice!r}, not one of this tenant's")
    if invoice is not None:  # an invoice charged off-session (dunning): it is paid, no credit is granted
        return _settle_invoice(app, batch, command, invoice, gateway=gateway, event_id=event_id)
    order = checkout_commands.known_order(batch, command.tenant, command.payload.get("order_id"))
    if order is not None:  # a checkout order: paid (exact total), credited and invoiced by its quote
        paid = checkout_commands.pay_order(
            app, batch, order, gateway=gateway, payment_id=str(command.payload.get("gateway_reference") or event_id),
            amount=parse_decimal(payload.text(command, "amount")), currency_code=payload.text(command, "currency"),
            at=payload.timestamp(command, "verified_at"), by=command.issued_by, command_id=command.command_id)
        return _with_parked_refunds(paid, _apply_parked_refunds(app, batch, account, command))
    grant = payment_grant_id(account.tenant, gateway, event_id)
    verified_at = payload.timestamp(command, "verified_at")
    account.grant_credit(
        grant_id=grant, unit=account.currency, amount=payload.subunits(command, "amount"), priority=0,
        effective_at=verified_at, expires_at=None, scope=None, source="purchase",
        cause={"gateway": gateway, "gateway_event_id": event_id, "order_id": payload.text(command, "order_id"),
               "command_id": str(command.command_id)},
        granted_by=command.issued_by,
    )
    repaid = repay_from_purchase(batch, account, grant, verified_at,
                                 {"gateway": gateway, "gateway_event_id": event_id})
    return _with_parked_refunds({"grant_id": str(grant), "overage_repaid": str(from_subunits(repaid))},
                                _apply_parked_refunds(app, batch, account, command))


def _with_parked_refunds(result: dict[str, Any], settled: list[dict[str, Any]]) -> dict[str, Any]:
    return {**result, "parked_refunds": settled} if settled else result


def _settle_invoice(app: LedgerApplication, batch: _Batch, command: LedgerCommand, invoice: Invoice, *,
                    gateway: str, event_id: str) -> dict[str, Any]:
    amount, code = parse_decimal(payload.text(command, "amount")), payload.text(command, "currency")
    # Its total, or what dunning charged of a total finer than the currency is charged in (``charge_of``).
    paid = paid_amount(invoice, amount) if code == invoice.currency and amount > 0 else None
    if invoice.document_type != INVOICE or paid is None:
        raise CommandRejected("invoice_payment_mismatch", f"payment {amount} {code} does not match "
                                                          f"{invoice.document_type} {invoice.number} of "
                                                          f"{invoice.total} {invoice.currency}")
    at = payload.timestamp(command, "verified_at")
    try:
        settled = settle_invoice(batch, invoice, at=at, payment=str(command.payload.get("gateway_reference") or event_id),
                                 by=command.issued_by, amount=paid)
    except InvoiceError as exc:  # a draft or void invoice: a person reconciles the money
        raise CommandRejected("invoice_not_payable", str(exc)) from exc
    result = {"invoice_id": str(invoice.id), "gateway": gateway, "already_paid": not settled}
    return _with_parked_refunds(result, apply_parked_invoice_refunds(app, batch, invoice, at) if settled else [])


@handles(PAYMENT_REFUNDED, keep_rejected=True)  # money that left at the gateway: each rejection is reconciled
def refund_purchase(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    account = _account_in_currency(batch, command)
    return _refund(app, batch, account, command, park=True)


def _refund(app: LedgerApplication, batch: _Batch, account: BillingAccount, command: LedgerCommand, *,
            park: bool) -> dict[str, Any]:
    """A gateway refund (see the module doc); ``park``: one whose payment is not booked yet waits for it."""
    gateway, event_id = payload.text(command, "gateway"), payload.text(command, "gateway_event_id")
    named_invoice = command.payload.get("invoice_id")
    invoice = tenant_invoice(batch, command.tenant, named_invoice or command.payload.get("order_id"))
    if named_invoice and invoice is None:
        raise CommandRejected("unknown_invoice", f"refund of invoice {named_invoice!r}, not one of this tenant's")
    if invoice is not None and park and _awaits_invoice_payment(invoice, command):
        return _park_refund(account, command, invoice=invoice)  # the invoice's payment has not been booked yet
    if invoice is not None:  # the refunded payment settled an invoice: a credit note, no credit moves
        return _refund_invoice(app, batch, command, invoice, gateway=gateway, event_id=event_id)
    known = checkout_commands.known_order(batch, command.tenant, command.payload.get("order_id"))
    if known is not None and park and known.status not in (ORDER_PAID, ORDER_REFUNDED):
        return _park_refund(account, command)  # its order's payment has not been booked yet
    if known is not None:  # a checkout order: what is left of it reversed (grants, credit note), once
        return refund_request_commands.gateway_refunded(
            app, batch, known, amount=parse_decimal(payload.text(command, "amount")),
            reference=str(command.payload.get("gateway_reference") or event_id),
            at=payload.timestamp(command, "verified_at"), by=command.issued_by, cause=dispute_cause(command))
    order = payload.text(command, "order_id")
    left = payload.subunits(command, "amount")
    caused = account.grants_caused_by(gateway=gateway, order_id=order)
    if park and not caused:
        return _park_refund(account, command)  # no payment of that order is booked yet
    # The money has left at the gateway: usage a give-back already returned as ``usage_reversal`` credit is
    # refunded too, and that credit taken back (``reclaim_reversed``; what of it was spent is owed).
    # The refund is money in the account's currency: only the order's grants in that unit are refunded by it. A
    # credit-unit grant's credits are not the money paid for them (a package's price per credit), so a refund of an
    # order with only such grants is rejected for reconciliation, nothing recorded (it was read as credits).
    grants = [g for g in caused if g["unit"] == account.currency and g["refundable"] + g["reversed"] > 0]
    if not grants and any(g["unit"] != account.currency for g in caused):
        raise CommandRejected("currency_mismatch", f"order {order!r} at {gateway} granted credit in "
                                                   f"{sorted({g['unit'] for g in caused})}, not money in "
                                                   f"{account.currency}: a person reconciles its refund")
    if sum(g["refundable"] + g["reversed"] for g in grants) < left:
        raise CommandRejected("unknown_purchase", f"order {order!r} at {gateway} has less than the refund paid for")
    refunds = []
    for index, grant in enumerate(grants):
        if left == 0:
            break
        part = min(left, grant["refundable"] + grant["reversed"])
        refund = uuid5(NAMESPACE_URL, f"/payments/{gateway}/{event_id}/refunds/{index}")
        account.refund_grant(grant_id=UUID(grant["grant_id"]), amount=part, refund_id=refund,
                             at=payload.timestamp(command, "verified_at"), finance_override=True,
                             reclaim_reversed=True,
                             cause={"gateway": gateway, "gateway_event_id": event_id, "order_id": order,
                                    "command_id": str(command.command_id), "forced_by": "gateway",
                                    **dispute_cause(command)})
        refunds.append(str(refund))
        left -= part
    return {"refunds": refunds}


def dispute_cause(command: LedgerCommand) -> dict[str, Any]:
    """What a refund's events add to their ``cause`` when a lost dispute (a chargeback) pays the money back: the
    dispute, so the read models tell a chargeback from a refund (``dispute_commands``)."""
    dispute = command.payload.get("dispute")
    return {"dispute": dispute} if isinstance(dispute, str) and dispute else {}


def parked_refund_key(gateway: str, reference: str) -> str:
    """A gateway refund's name while it waits for its payment: the gateway's refund reference (else its event)."""
    return f"{gateway}/{reference}"


def _awaits_invoice_payment(invoice: Invoice, command: LedgerCommand) -> bool:
    """A refund of ``invoice``'s payment before that payment is booked: the invoice is finalized, not paid, and the
    refund is one a payment of it could take (its currency, at most its total). Anything else is judged now, as
    after the payment (``_refund_invoice``: ``invoice_refund_mismatch``); a draft or void invoice is never paid."""
    amount, code = parse_decimal(payload.text(command, "amount")), payload.text(command, "currency")
    return invoice.document_type == INVOICE and invoice.status == FINALIZED and code == invoice.currency \
        and 0 < amount <= invoice.total


def _park_refund(account: BillingAccount, command: LedgerCommand, invoice: Invoice | None = None) -> dict[str, Any]:
    """The gateway paid this refund out before the ledger booked the payment it gives back (the notifications
    crossed): recorded on the account (``RefundAwaitingPayment``), applied by that payment's command (``invoice``:
    by the command that pays that invoice, ``apply_parked_invoice_refunds``)."""
    gateway = payload.text(command, "gateway")
    reference = str(command.payload.get("gateway_reference") or payload.text(command, "gateway_event_id"))
    key = parked_refund_key(gateway, reference)
    refunded = command.payload.get("refunded_payment")
    try:
        parked = account.park_refund(
            key=key, gateway=gateway, order_id=payload.text(command, "order_id"),
            refunded_payment=refunded if isinstance(refunded, str) and refunded else None,
            refund={"command_id": str(command.command_id), "kind": command.kind, "tenant": command.tenant,
                    "issued_at": command.issued_at.isoformat(), "issued_by": command.issued_by,
                    "payload": dict(command.payload)},
            at=payload.timestamp(command, "verified_at"), invoice=str(invoice.id) if invoice is not None else None)
    except TooManyParkedRefunds as exc:
        raise CommandRejected("too_many_parked_refunds", f"refund {reference}: {exc}; reconcile by hand") from exc
    return {"awaiting_payment": key, "already_awaiting": not parked}


def _apply_parked_refunds(app: LedgerApplication, batch: _Batch, account: BillingAccount,
                          command: LedgerCommand) -> list[dict[str, Any]]:
    """The refunds of the payment ``command`` just booked that came before it (``_park_refund``), applied now in
    the same transaction, exactly as if they had come after it (at the payment's time if they are older).

    A parked refund names the order it gives back and, when the gateway said, the payment
    (``refunded_payment``): a refund of another payment of the order waits on. One that cannot be applied (a
    refund that would be rejected after its payment too, e.g. part of an order) is settled ``rejected`` with that
    reason, nothing moved, and the payment is booked all the same: the money was received."""
    gateway = payload.text(command, "gateway")
    order = command.payload.get("order_id")
    reference = str(command.payload.get("gateway_reference") or payload.text(command, "gateway_event_id"))
    booked_at = payload.timestamp(command, "verified_at")
    settled = []
    for parked in account.parked_refunds(gateway=gateway, order_id=str(order)) if order else ():
        named = parked["refunded_payment"]
        if named and command.payload.get("gateway_reference") and named != reference:
            continue
        settled.append(_settle_parked(app, batch, account, parked, payment=reference, booked_at=booked_at))
    return settled


def apply_parked_invoice_refunds(app: LedgerApplication, batch: _Batch, invoice: Invoice,
                                 at: datetime) -> list[dict[str, Any]]:
    """``invoice`` was just paid (``settle_invoice``: the gateway's ``payment_succeeded`` or ``invoice.mark_paid``,
    dunning's charge or a payment booked by hand): the gateway refunds of its payment that came before it
    (``_park_refund`` with the invoice) are applied now, in the same transaction, exactly as if they had come after
    it: a credit note each, at the payment's time ``at`` when they are older. Every one of them is settled, as a
    refund after the payment would be: ``applied``, or ``rejected`` with that refund's reason (the refund of another
    payment than the one that paid it: ``refund_of_other_payment``), nothing of it moved, the payment booked."""
    account = account_of(batch, invoice.tenant)
    payment = invoice.payment or ""
    return [_settle_parked(app, batch, account, parked, payment=payment, booked_at=at)
            for parked in account.parked_refunds(invoice=str(invoice.id))]


def _settle_parked(app: LedgerApplication, batch: _Batch, account: BillingAccount, parked: dict[str, Any], *,
                   payment: str, booked_at: datetime) -> dict[str, Any]:
    """Applies one parked refund as a refund after its payment ``payment`` booked at ``booked_at`` and records how
    it ended (``ParkedRefundSettled``)."""
    first = parked["refund"]
    refund = LedgerCommand(
        command_id=UUID(first["command_id"]), kind=first["kind"], tenant=first["tenant"],
        issued_at=datetime.fromisoformat(first["issued_at"]), issued_by=first["issued_by"],
        payload={**first["payload"], "verified_at": max(parked["at"], booked_at).isoformat()})
    before = _pending_counts(batch)
    outcome, reason, detail, value = "applied", None, None, None
    try:
        value = _refund(app, batch, account, refund, park=False)
    except (CommandRejected, LedgerError) as exc:
        if _pending_counts(batch) != before:
            raise  # refused half-way: the whole payment command is rejected and undone (recorded)
        outcome = "rejected"
        reason = exc.reason if isinstance(exc, CommandRejected) else _snake(type(exc).__name__)
        detail = exc.detail if isinstance(exc, CommandRejected) else str(exc)
    account.settle_parked_refund(key=parked["key"], payment=payment, outcome=outcome, reason=reason,
                                 detail=detail, at=booked_at)
    return {"refund": parked["key"], "outcome": outcome, "reason": reason, "detail": detail, "value": value}


def _pending_counts(batch: _Batch) -> dict[UUID, int]:
    return {i: len(a.pending_events) for i, a in batch.loaded.items() if a is not None and a.pending_events}


def refund_credit_note_key(invoice: Invoice, gateway: str, reference: str) -> str:
    return f"invoices/{invoice.id}/refunds/{gateway}/{reference}"


def _refund_invoice(app: LedgerApplication, batch: _Batch, command: LedgerCommand, invoice: Invoice, *,
                    gateway: str, event_id: str) -> dict[str, Any]:
    """A gateway refund of an invoice's payment: a credit note for the refunded amount (see the module doc)."""
    amount, code = parse_decimal(payload.text(command, "amount")), payload.text(command, "currency")
    reference = str(command.payload.get("gateway_reference") or event_id)
    if invoice.document_type != INVOICE or invoice.status != PAID or code != invoice.currency \
            or not 0 < amount <= invoice.total:
        raise CommandRejected("invoice_refund_mismatch", f"refund {amount} {code} of {invoice.document_type} "
                                                         f"{invoice.number} ({invoice.status}, {invoice.total} "
                                                         f"{invoice.currency}): reconcile by hand")
    other = _refund_of_other_payment(invoice, command.payload.get("refunded_payment"))
    if other is not None:  # that money never paid the invoice: its revenue and tax stay, finance reconciles it
        raise CommandRejected("refund_of_other_payment", f"refund {reference} of invoice {invoice.number}: {other}; "
                                                         "reconcile by hand")
    key = refund_credit_note_key(invoice, gateway, reference)
    existing = batch.get(invoice_id(invoice.tenant, key))
    if existing is not None:  # the same refund announced by another event
        return {"invoice_id": str(invoice.id), "credit_note": str(existing.id), "already_refunded": True}
    at = payload.timestamp(command, "verified_at")
    tax_total = sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] == "tax"), Decimal(0))
    left = RATING_CONTEXT.subtract(invoice.total, invoice.given_back)  # not refunded nor credited yet
    # What of it its payment never paid (a total finer than its currency is charged in: 12.957 KWD paid 12.950, the
    # 0.007 written off then). A refund of all the rest of the money is the last: it gives the whole invoice back.
    unpaid = min(Decimal(invoice.written_off), max(left, Decimal(0)))
    if amount == invoice.paid_total and not invoice.given_back:
        lines = reversing_lines(invoice)  # its own tax, never tax computed now
        if unpaid:
            lines.append(_written_off_line(invoice, unpaid))
    else:
        # Tax is given back in the invoice's own proportion; rounded once, the net takes the rest (exact sum). Never
        # more than the invoice has left to give back (net and tax): credits for unused time gave the rest already.
        last = bool(unpaid) and amount >= RATING_CONTEXT.subtract(left, unpaid)
        back = left if last else min(amount, max(left, Decimal(0)))
        tax_left = max(RATING_CONTEXT.subtract(tax_total, Decimal(invoice.given_back_tax)), Decimal(0))
        tax = min(round_minor(RATING_CONTEXT.divide(RATING_CONTEXT.multiply(back, tax_total), invoice.total),
                              currency(code)), tax_left, back) if back else Decimal(0)
        if back == left:
            tax = min(tax_left, back)  # the last of it: exactly the tax it has left
        lines = [_refund_line("adjustment", f"Refund {reference} of invoice {invoice.number}", -(back - tax), code),
                 _refund_line("tax", f"Tax refunded of invoice {invoice.number}", -tax, code)]
        if last:
            lines.append(_written_off_line(invoice, unpaid))
        paid_back = RATING_CONTEXT.subtract(back, unpaid) if last else back  # of the money the invoice was paid
        if amount > paid_back:
            # The gateway gave back money the invoice had already given back as credit for unused time (a cancel's
            # or change's): taken back from that credit as far as it is unspent, else owed (``reclaimed``).
            lines.append(_refund_line("adjustment", f"Refund {reference} beyond what invoice {invoice.number} had "
                                                    "left: taken back from its credit notes' account credit, else owed",
                                      -(amount - paid_back), code, reclaimed=True))
    note = Invoice(tenant=invoice.tenant, key=key, document_type=CREDIT_NOTE, currency=code, lines=lines,
                   period_start=invoice.period_start, period_end=invoice.period_end,
                   subscription_id=invoice.subscription_id, related_invoice=str(invoice.id), at=at, by=command.issued_by)
    batch.add(note)
    _finalize(app, batch, note, at, command.issued_by, refunded=True)
    given = [Decimal(item["amount"]) for item in note.lines if not item.get("reclaimed") and not item.get("written_off")]
    given_tax = sum((Decimal(item["amount"]) for item in note.lines if item["kind"] == "tax"), Decimal(0))
    invoice.record_given_back(document=note.id, net=-(sum(given, Decimal(0)) - given_tax), tax=-given_tax,
                              by=command.issued_by)
    if note.total != -amount:  # a rejection (recorded, everything undone), never an error that blocks the partition
        raise CommandRejected("invoice_refund_mismatch", f"the credit note of refund {reference} would credit "
                                                         f"{-note.total} {code}, not the {amount} refunded: "
                                                         "reconcile by hand")
    return {"invoice_id": str(invoice.id), "credit_note": str(note.id), "credit_note_number": note.number,
            "amount": str(amount), "gateway": gateway}


def _refund_line(kind: str, description: str, amount: Decimal, code: str, **extra: Any) -> dict[str, Any]:
    """A line of a refund's credit note, in the currency's ISO 4217 digits and never rounded again: its amounts are
    the money paid back (in what the currency is charged in), a share of tax rounded once already, or what is left of
    the invoice's own amounts, which may be finer than the currency is billed in now (0.617 KWD of tax on an invoice
    finalized before session 13: ``line`` would round the last of it to 0.620, more tax than the invoice charged)."""
    digits = Decimal(1).scaleb(-currency(code).minor_scale)
    exact = amount.quantize(digits, context=RATING_CONTEXT)
    return {**line(kind, description, Decimal(0), code, **extra), "amount": str(exact), "exact_amount": str(exact)}


def _written_off_line(invoice: Invoice, unpaid: Decimal) -> dict[str, Any]:
    """What the credit note of a refund of all an invoice was paid shows of the part its payment never paid (written
    off when it was paid, ``Invoice.written_off``): the note gives the whole invoice back, its lines and tax, less
    this, so it credits exactly the money refunded. After tax (no tax of its own: the invoice's tax is given back in
    full) and not given back (``written_off``): the write-off already took it off the invoice's revenue."""
    return _refund_line("adjustment", f"Not paid of invoice {invoice.number} (finer than {invoice.currency} is "
                                      "charged in), written off when it was paid: nothing to pay back",
                        unpaid, invoice.currency, after_tax=True, written_off=True)


def _refund_of_other_payment(invoice: Invoice, refunded: Any) -> str | None:
    """Why a refund cannot be of the payment that paid ``invoice`` (None: it is, or may only be, that one).

    ``refunded`` is the notification's ``refunded_payment``: it must be the invoice's ``payment``. Unknown (a
    notification published before ingest named it), the refund is taken for the invoice's payment only when no
    other payment of the invoice is known: not when a payment booked by hand (``manual:``, which no gateway
    refunds) or none paid it, nor when a charge of it other than the one that paid it was under way (a pending
    debit that succeeded after another payment was rejected ``invoice_already_paid``, never booked).
    """
    paid_by = invoice.payment or ""
    if isinstance(refunded, str) and refunded:
        return None if refunded == paid_by else f"it gave back payment {refunded}, the invoice was paid by {paid_by}"
    others = sorted({p for p in invoice.pending_payments.values() if p != paid_by})
    if not paid_by or paid_by.startswith("manual:") or others:
        return (f"it names no payment, and the invoice was paid by {paid_by or 'an unrecorded payment'}"
                + (f" while {', '.join(others)} was also charged" if others else ""))
    return None


@handles(PAYMENT_FAILED)
def payment_failed(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    _account_in_currency(batch, command)
    named = command.payload.get("invoice_id")
    invoice = tenant_invoice(batch, command.tenant, named or command.payload.get("order_id"))
    if invoice is None or invoice.document_type != INVOICE:
        raise CommandRejected("unknown_invoice", f"failed payment for {named!r}, not one of this tenant's invoices")
    reference = str(command.payload.get("gateway_reference") or payload.text(command, "gateway_event_id"))
    if invoice.status != FINALIZED:  # paid by other means meanwhile, or voided: nothing to follow
        return {"invoice_id": str(invoice.id), "followed": False, "status": invoice.status}
    attempt = invoice.payment_failed(payment=reference, at=payload.timestamp(command, "verified_at"),
                                     by=command.issued_by)
    return {"invoice_id": str(invoice.id), "followed": attempt is not None, "attempt": attempt}
