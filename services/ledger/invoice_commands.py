"""Ledger commands of an invoice's life after it is drafted: ``invoice.usage_lines`` (rating's lines for an ended
period: the renewal or final draft is completed and finalized), ``invoice.mark_paid`` / ``payment_pending`` /
``payment_failed`` (dunning and payments) and ``invoice.void``. Documents are made, taxed, numbered and posted by
:mod:`billing_ledger.subscription_commands`.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.messages import LedgerCommand
from billing_events.money import (
    RATING_CONTEXT,
    MoneyError,
    charged_floor,
    currency,
    parse_decimal,
    to_subunits,
)
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import (
    CREDIT_NOTE,
    DRAFT,
    INVOICE,
    PAID,
    Invoice,
    invoice_id,
    is_credit_note_usage,
    line,
)
from billing_ledger.domain.subscription import ACTIVE, INCOMPLETE
from billing_ledger.invoice_overage import (
    commit_period_minimum,
    credit_usage_lines,
    minimum_commitment_lines,
    overage_lines,
    settle_paid,
)
from billing_ledger.payload import INVALID, optional_text
from billing_ledger.payload import at as effective_at
from billing_ledger.payload import timestamp as payload_timestamp
from billing_ledger.subscription_commands import (
    _activate,
    _credit_given,
    _expire_incomplete,
    _finalize,
    _tenant,
)


@handles("invoice.usage_lines")
def add_usage_lines(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    """Rating's lines for an ended period go on the renewal draft, which is then finalized."""
    tenant = _tenant(command)
    key = command.payload.get("invoice_key")
    if not isinstance(key, str) or not key:
        raise CommandRejected(INVALID, "invoice_key must be a non-empty string")
    # Checked before anything changes: a malformed command is rejected whole, never half-applied or applied
    # as if it had no lines (``lines: ""`` finalized a renewal without its usage).
    items = _usage_items(command)
    at = effective_at(command)
    start, end = _period_bound(command, "period_start"), _period_bound(command, "period_end")
    invoice = batch.get(invoice_id(tenant, key))
    if invoice is None:
        raise CommandRejected("unknown_invoice", f"no draft {key!r}")
    lines = [line(item["kind"], item["description"], parse_decimal(item["amount"], allow_negative=True),
                  invoice.currency, **{k: v for k, v in item.items() if k not in ("kind", "description", "amount")})
             for item in items]
    catalog = batch.get(Catalog.create_id())
    credit_units = (getattr(catalog, "document", None) or {}).get("credit_units") or {}
    primary = command.payload.get("primary", True)
    if not isinstance(primary, bool):
        raise CommandRejected("invalid_usage_lines", f"primary must be true or false, not {primary!r}")
    if primary:
        # The account's overage is billed by its primary subscription's invoices alone (rating rates usage into
        # that one's periods): a secondary's renewal or final invoice (``primary`` false) takes none of it.
        sub = batch.get(UUID(invoice.subscription_id)) if invoice.subscription_id else None
        own = (sub.plan.get("list_currency") or sub.plan["currency"]) if sub is not None else None  # the plan's
        lines = credit_usage_lines(account_of(batch, tenant), lines, start or invoice.period_start)
        lines += overage_lines(account_of(batch, tenant), invoice, lines, credit_units,
                               start or invoice.period_start, end or at, at, own)
    lines += minimum_commitment_lines(invoice, lines)
    if primary:
        commit_period_minimum(account_of(batch, tenant), invoice, lines, start or invoice.period_start, at)
    # A credit note's credit applied is a payment: shown after the tax, which it is not part of.
    after_tax = [item for item in lines if item.get("after_tax")]
    invoice.add_lines([item for item in lines if not item.get("after_tax")], by=command.issued_by)
    _finalize(app, batch, invoice, at, command.issued_by, after_tax=after_tax)


def _usage_items(command: LedgerCommand) -> list[dict[str, Any]]:
    """The payload's ``lines``: a list (absent: none) of objects with a string kind and description."""
    items = command.payload.get("lines", [])
    if not isinstance(items, list):
        raise CommandRejected(INVALID, "lines must be a list of line objects")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(f), str) for f in ("kind", "description")) \
                or "amount" not in item:
            raise CommandRejected(INVALID, f"lines[{index}] must be an object with a kind, a description and an "
                                           "amount")
        if item["kind"] not in RATING_LINE_KINDS:
            # Tax, credits applied, overage and the minimum commitment are the ledger's own lines, never a caller's.
            raise CommandRejected(INVALID, f"lines[{index}]: rating sends usage lines, not {item['kind']!r}")
    return items


RATING_LINE_KINDS = frozenset({"usage"})


def _period_bound(command: LedgerCommand, field: str) -> datetime | None:
    """An optional period bound: absent (None) or an ISO 8601 timestamp with an offset; a naive one would be read
    in the server's zone and move the period (and the overage it bills)."""
    return None if command.payload.get(field) is None else payload_timestamp(command, field)


def tenant_invoice(batch: _Batch, tenant: str | None, reference: str | None) -> Invoice | None:
    """The ``Invoice`` (or credit note) ``reference`` names (its UUID), if it is one of ``tenant``'s."""
    if not tenant or not reference:
        return None
    try:
        found = batch.get(UUID(str(reference)))
    except ValueError:
        return None
    return found if isinstance(found, Invoice) and found.tenant == tenant else None


def charge_of(invoice: Invoice) -> Decimal:
    """What a gateway is asked to charge for ``invoice``: its total, in what its currency is charged in. An invoice
    finalized before its currency was billed in hundredths (12.957 KWD, before session 13) is charged its total
    rounded down to that (12.950: Stripe and Razorpay take no last digit of thousandths), and paying it writes the
    rest off (``settle_invoice``); it was declined at every dunning attempt."""
    return charged_floor(invoice.total, currency(invoice.currency))


def paid_amount(invoice: Invoice, amount: Decimal) -> Decimal | None:
    """``amount`` if it pays ``invoice`` in full: its total, or what a gateway charges of it (``charge_of``); else
    None (a payment that does not match is for a person to reconcile)."""
    return amount if amount in (invoice.total, charge_of(invoice)) else None


def settle_invoice(batch: _Batch, invoice: Invoice, *, at: datetime, payment: str, by: str,
                   amount: Decimal | None = None) -> bool:
    """Marks a finalized invoice paid (its past_due subscription recovers, an incomplete one is activated);
    ``False`` when it already was paid by this same ``payment``. ``amount`` (``paid_amount``; default: the total):
    what was paid; less than the total (``charge_of`` an invoice finer than its currency is charged in) writes the
    difference off first (``BillingAccount.write_off_charge_rounding``), so the payment clears what is left.

    Idempotent for one payment, because dunning's ``invoice.mark_paid`` and the gateway's webhook for the same
    charge both settle it, in either order. Another payment of an invoice already paid (a pending charge that
    succeeded after a bank transfer paid it) is money received twice: refused (``invoice_already_paid``, the
    command's rejected receipt is what finance reconciles: refund it or credit it), never absorbed. A payment
    without a reference claims no money of its own and changes nothing (``invoice.mark_paid`` pays an unpaid
    invoice without one under ``manual:<command id>``, so it is never without one). A draft or void invoice is refused
    (``InvoiceError``).
    """
    if invoice.status == PAID:
        if payment and invoice.payment and payment != invoice.payment:
            raise CommandRejected("invoice_already_paid", f"invoice {invoice.number} was paid by {invoice.payment}; "
                                                          f"payment {payment} paid it again: reconcile it by hand")
        return False
    short = RATING_CONTEXT.subtract(invoice.total, amount) if amount is not None else Decimal(0)
    invoice.mark_paid(at=at, payment=payment, by=by, written_off=short)
    if invoice.document_type == INVOICE:
        account = account_of(batch, invoice.tenant)
        if short:
            account.write_off_charge_rounding(
                invoice=str(invoice.id), unit=invoice.currency, amount=to_subunits(short), at=at,
                cause={"invoice_number": invoice.number, "payment": payment, "total": str(invoice.total),
                       "paid": str(amount)})
        settle_paid(account, invoice, at, payment)  # the overage it billed
    if invoice.subscription_id:
        sub = batch.get(UUID(invoice.subscription_id))
        if sub is not None and sub.status == INCOMPLETE and invoice.document_type == INVOICE:
            _activate(batch, sub, at, by)  # charge_before_access: access once its first invoice is paid
        elif sub is not None:
            sub.mark_paid(at=at, by=by)
    return True


def _named_invoice(batch: _Batch, command: LedgerCommand) -> Invoice:
    """The invoice the payload's ``invoice_id`` (a UUID string) names, if it is one of the command's tenant's;
    every other case is rejected: no tenant, a malformed id, another tenant's invoice or none."""
    tenant = _tenant(command)
    reference = command.payload.get("invoice_id")
    try:
        UUID(reference if isinstance(reference, str) else "")
    except ValueError as exc:
        raise CommandRejected(INVALID, "invoice_id must be a UUID string") from exc
    invoice = tenant_invoice(batch, tenant, reference)
    if invoice is None:
        raise CommandRejected("unknown_invoice", f"invoice {reference} is not one of tenant {tenant!r}'s")
    return invoice


def _flag(command: LedgerCommand, field: str, default: bool) -> bool:
    value = command.payload.get(field, default)
    if not isinstance(value, bool):
        raise CommandRejected(INVALID, f"{field} must be true or false")
    return value


@handles("invoice.mark_paid")
def mark_invoice_paid(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    invoice = _named_invoice(batch, command)
    payment = _payment_reference(command)
    if payment is None and invoice.status != PAID:
        # Paid without a reference (a bank transfer booked by hand) is still a payment: it is recorded under one
        # of its own, so a gateway payment afterwards is money received twice (``invoice_already_paid``), never
        # absorbed as "already paid". Deterministic (the command's id), so replay and redelivery agree.
        payment = f"manual:{command.command_id}"
    at = effective_at(command)
    amount = None
    if command.payload.get("amount") is not None:  # what was charged (dunning): the total, or ``charge_of`` it
        try:
            amount = paid_amount(invoice, parse_decimal(command.payload["amount"], field="amount"))
        except MoneyError as exc:
            raise CommandRejected(INVALID, str(exc)) from exc
        if amount is None:
            raise CommandRejected("invoice_payment_mismatch", f"payment {command.payload['amount']} "
                                                              f"{invoice.currency} does not pay invoice "
                                                              f"{invoice.number} of {invoice.total} {invoice.currency}")
    settled = settle_invoice(batch, invoice, at=at, payment=payment or "", by=command.issued_by, amount=amount)
    result: dict[str, Any] = {"invoice_id": str(invoice.id), "already_paid": not settled}
    if settled and amount is not None and amount != invoice.total:
        result["written_off"] = str(RATING_CONTEXT.subtract(invoice.total, amount))
    if settled:
        # Gateway refunds of its payment that came before this (dunning's charge is booked here, its webhook may be
        # later) are applied now, as after it. Imported here: payment_commands imports this module.
        from billing_ledger.payment_commands import apply_parked_invoice_refunds

        parked = apply_parked_invoice_refunds(app, batch, invoice, at)
        if parked:
            result["parked_refunds"] = parked
    return result


def _payment_reference(command: LedgerCommand) -> str | None:
    """The payload's ``payment``: a gateway's or a person's reference, or None when absent or empty (dunning sends
    "" for a charge without one); anything but a string is rejected, never stored as ``"None"`` or ``"5"``."""
    value = command.payload.get("payment")
    if value is None or value == "":
        return None
    return optional_text(command, "payment")


@handles("invoice.payment_pending")
def invoice_payment_pending(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    """A dunning charge is under way at the gateway (its webhook settles the invoice): its receipt says dunning
    charges that attempt no more (see ``dunning.py``); the invoice keeps the charge's reference, so a
    ``payment_failed`` notification of it is followed (``payment_commands``)."""
    invoice = _named_invoice(batch, command)
    payment = _payment_reference(command)
    attempt = command.payload.get("attempt")
    if attempt is not None and (not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0):
        raise CommandRejected(INVALID, "attempt must be a whole number, 0 or more")
    if payment and attempt:
        invoice.payment_pending(attempt=attempt, payment=payment, at=effective_at(command), by=command.issued_by)


@handles("invoice.payment_failed")
def invoice_payment_failed(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    """After the last dunning retry the subscription goes past_due (an incomplete one expires: never paid). A month's
    credit note usage invoice (no subscription) stays open, owed: recorded, nothing else changes."""
    invoice = _named_invoice(batch, command)
    if not invoice.subscription_id and not is_credit_note_usage(invoice):
        raise CommandRejected("unknown_invoice", f"invoice {invoice.number} belongs to no subscription")
    final, at = _flag(command, "final", True), effective_at(command)  # checked whether or not they are used
    if not invoice.subscription_id:
        return
    sub = batch.get(UUID(invoice.subscription_id))
    if sub is not None and sub.status == ACTIVE and final:
        sub.mark_past_due(at=at, reason="payment_failed", by=command.issued_by)
    elif sub is not None and sub.status == INCOMPLETE and final:
        _expire_incomplete(batch, sub, at, command.issued_by)


@handles("invoice.void")
def void_invoice(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    invoice = _named_invoice(batch, command)
    if invoice.document_type == CREDIT_NOTE:
        # Its money already moved (account credit granted, tax given back, or a gateway refund), and voiding
        # would leave that in place: a wrong credit note is corrected by a new invoice, not voided.
        raise CommandRejected("credit_note_not_voidable", f"credit note {invoice.number} cannot be voided; "
                                                          "correct it with a new invoice")
    if invoice.corrections:
        # A change's or cancel's credit note gave account credit for part of its period: voiding it would leave
        # that credit spendable for a fee no longer owed (it is collected as issued; write off the rest with an
        # account adjustment instead).
        notes = [batch.get(UUID(note)) for note in invoice.corrections]
        numbers = ", ".join(str(note.number if note is not None else "?") for note in notes)
        raise CommandRejected("invoice_has_credit_notes", f"invoice {invoice.number} cannot be voided: {numbers} "
                                                          "credited part of it; adjust the account instead")
    at = effective_at(command)
    invoice.void(at=at, reason=optional_text(command, "reason") or "void", by=command.issued_by)
    corrected = batch.get(UUID(invoice.related_invoice)) if invoice.subscription_id and invoice.related_invoice \
        else None
    restored = None
    if isinstance(corrected, Invoice):
        # A change's invoice netted a credit for the unused time of the invoice it corrects (-15.00 + 30.00): the
        # void reverses all it billed, that credit with it, so the corrected invoice is owed in full again and has
        # given nothing back for it; a later cancel or change credits its unused time (against it, the period's
        # live invoice: ``live_period_invoice``). Left recorded, the cancel credited nothing (30.00 owed for 20
        # days, 25.00 without the void).
        net, tax = _credit_given(invoice)
        corrected.restore_given_back(document=invoice.id, net=net, tax=tax, by=command.issued_by)
        if net > 0 and corrected.status != DRAFT:
            # Its fee for the rest of the period is owed again: deferred on its schedule, not recognised at the void
            # (a renewal still a draft holds the credit pending: ``_pending_fee_credits``, as before).
            restored = str(corrected.id)
    if invoice.subscription_id or is_credit_note_usage(invoice):
        # Its fees and tax are no longer owed; the usage it billed is, unbilled again. (A credit note usage invoice's
        # tax: the credit it applied is not counted again, the void writes that VAT off.)
        account = account_of(batch, invoice.tenant)
        account.void_invoice_bill(invoice=str(invoice.id), at=at, cause={"invoice_number": invoice.number},
                                  restored=restored)
        account.return_invoiced_overage(invoice=str(invoice.id), at=at)
