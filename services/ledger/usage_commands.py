"""Ledger command ``usage.debit``: rating's usage debit on the account (a give-back when negative), and the credit
note of a correction of usage an invoice already billed.

A correction (``correction_of`` at ingest) that lowers usage rating priced in a period whose overage a
subscription invoice has billed (``BillingAccount.billed_overage``: that invoice, and what of the period's overage
no correction credited yet) corrects that invoice: a credit note against it (``related_invoice``, recorded on the
invoice, which can then no longer be voided) credits the corrected usage, up to what the invoice billed for the
period, as the invoice's usage line of the meter charged it: that line rounded (``round_minor``) before the
correction less the line rounded after it (since session 11: 0.005 of usage billed 0.01, its void credits 0.01,
and 1.234 billed 1.23 credits 1.23, the 0.004 its rounding took off already absorbed; it used to credit the exact
usage rounded down, 0.00 and 1.23 with 0.004 given back on top), so the invoice less its notes bills the
corrected usage exactly as a line would; without such a line (overage of earlier periods, invoices billed before
session 9) it is the corrected usage rounded down. The tax is at the rate that invoice charged
(``document_tax_lines``), as account credit (``credit_note_grant``: Dr RECOGNISED_REVENUE net / Dr TAX_PAYABLE tax
/ Cr TENANT_WALLET), whether the invoice is paid or not: it is collected as issued, like the invoice a change's or
cancel's credit note corrects. The rest of the give-back (usage prepaid credit paid for, so not on the invoice's
total; less than a minor unit) is given back as before. A correction of usage not invoiced yet, of credit-unit
usage, or of a period older than the account remembers gives back as before (it reduces the open period).

The corrected period is the one rating priced the original in: a late correction names it in
``cause.original_period`` (with ``cause.corrects``; rating prices it in that period and sends the same key as its
``period``, while commands sent before session 8 have the open period they were rated into there), any other
give-back in ``cause.period``.
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any
from uuid import UUID

from billing_events.messages import LedgerCommand
from billing_events.money import (
    RATING_CONTEXT,
    currency,
    from_subunits,
    is_currency_code,
    round_minor,
    to_subunits,
)
from billing_events.timeutil import parse_timestamp
from billing_ledger import payload as fields
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import FINALIZED, PAID, Invoice, line
from billing_ledger.domain.subscription import Subscription
from billing_ledger.invoice_overage import usage_spend
from billing_ledger.subscription_commands import _document, _left_to_give_back


@handles("usage.debit")
def debit_usage(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account = account_of(batch, command.tenant)
    payload = command.payload
    unit, amount, meter = payload["unit"], _subunits(command), payload["meter"]
    at = parse_timestamp(payload["at"])
    cause = payload.get("cause", {})
    credit_note = _credit_invoiced_usage(app, batch, account, command, unit, amount, meter, at, cause) \
        if amount < 0 else None
    account.debit_usage(
        command_id=command.command_id,
        unit=unit,
        amount=amount,
        meter=meter,
        at=at,
        overage_policy=payload.get("overage_policy", "overage"),
        cause=cause,
        credit_note=credit_note,
    )


def _subunits(command: LedgerCommand) -> int:
    """The debit's ``amount_subunits``: an integer as rating sends it; 2.5 or "3" is rejected, never truncated or
    converted (the money posted would not be what was rated)."""
    amount = fields.optional_whole(command, "amount_subunits")
    if amount is None:
        raise CommandRejected("invalid_command", "amount_subunits is required")
    return amount


def corrected_period(cause: Any) -> str | None:
    """The period key (as rating priced it) a give-back corrects: a late correction's original period, else its own."""
    if not isinstance(cause, dict):
        return None
    original = cause.get("original_period")
    if cause.get("corrects") and isinstance(original, str) and original:
        return original
    period = cause.get("period")
    return period if isinstance(period, str) and period else None


def _credit_invoiced_usage(app: LedgerApplication, batch: _Batch, account: BillingAccount, command: LedgerCommand,
                           unit: Any, amount: int, meter: Any, at: datetime, cause: Any) -> list[dict[str, Any]] | None:
    """The credit notes of a give-back of ``amount`` (< 0) sub-units of usage invoices billed (module docstring),
    finalized and posted, newest invoice first; what each credited and absorbed for ``BillingAccount.debit_usage``
    (``credit_note``), or ``None``."""
    period = corrected_period(cause)
    if period is None or not isinstance(unit, str) or not is_currency_code(unit) or not isinstance(meter, str):
        return None
    scale = currency(unit)
    minor = Decimal(1).scaleb(-scale.billed_scale)  # what the invoice's lines are rounded to (``round_minor``)
    left, credited = -amount, []
    # The period's minimum spend, across every invoice that billed it: what its usage spend is above it is all the
    # corrections can credit, newest invoice first (``None``: not remembered, capped per invoice as before).
    minimum = account.period_minimum(unit, period)
    headroom = None if minimum is None else \
        from_subunits(max(minimum["spend"] - minimum["minimum"], 0)).quantize(minor, rounding=ROUND_DOWN)
    for billed in account.billed_overage(unit, period):
        invoice = batch.get(UUID(billed["invoice"]))
        if not isinstance(invoice, Invoice) or invoice.status not in (FINALIZED, PAID) or invoice.currency != unit \
                or not invoice.subscription_id:
            continue
        sub = batch.get(UUID(invoice.subscription_id))
        if not isinstance(sub, Subscription):
            continue
        corrected = min(left, billed["amount"])  # the usage this invoice billed that the correction takes back
        exact = _line_exact(batch, invoice, meter, period)
        if exact is None:
            # Rounded down: the note never credits more than the give-back (a sub-unit rest is given back as before).
            due = from_subunits(corrected).quantize(minor, rounding=ROUND_DOWN)
            if due <= 0:
                break
        else:
            # What the meter's line charged less what it would charge without the corrected usage, each rounded as
            # the line was: the rounding the invoice posted (``round_invoiced_overage``) goes with the usage.
            after = RATING_CONTEXT.subtract(exact, from_subunits(corrected))
            due = max(RATING_CONTEXT.subtract(round_minor(exact, scale), round_minor(after, scale)), Decimal(0))
        corrects = cause.get("corrects")
        description = f"Usage corrected: {meter}, billed on {invoice.number}"
        if headroom is None:
            creditable = min(due, _minimum_headroom(batch, invoice, period, due))
        else:
            creditable = min(due, headroom)
            headroom -= creditable
        lines = [line("usage_correction", description, -creditable,
                      unit, meter=meter, period=period, usage_corrected=str(from_subunits(corrected)),
                      **({"corrects": str(corrects)} if corrects else {}))]
        # Never more than the invoice has not given back yet (a refund gave back all of it: nothing).
        lines = _left_to_give_back([item for item in lines if Decimal(item["amount"])], invoice)
        note = None
        if lines:
            key = f"{sub.id}/usage-correction/{command.command_id}" + (f"/{invoice.id}" if credited else "")
            # Issued when the correction is, not at the corrected usage's time (``at``): in this year's sequence,
            # after the invoice it corrects, and in the figures of the day it is issued.
            note = _document(app, batch, sub, key, lines, command.issued_at, command.issued_by, finalize=True,
                             start=invoice.period_start, end=invoice.period_end, corrects=invoice)
            if note is None:  # the key is the command's id: a redelivery never reaches here (its receipt refuses it)
                continue
        net = -Decimal(lines[0]["amount"]) if lines else Decimal(0)
        if exact is None:
            taken = to_subunits(due)
            amount_credited = to_subunits(net)
        else:
            # The note may credit up to a minor unit more or less than the usage it corrects (the line's rounding):
            # the give-back it covers is the usage corrected, the part it did not credit absorbed (the rounding or a
            # minimum commitment kept it billed), never given back again.
            taken = corrected
            amount_credited = min(to_subunits(net), corrected)
        credited.append({"note": str(note.id) if note is not None else None, "invoice": str(invoice.id),
                         "period": period, "amount": amount_credited, "absorbed": taken - amount_credited})
        left -= taken
    return [entry for entry in credited if entry["amount"] or entry["absorbed"]] or None


def _line_exact(batch: _Batch, invoice: Invoice, meter: str, period: str) -> Decimal | None:
    """The exact amount ``invoice``'s usage line of ``meter`` (the one whose ``trace.rating_periods`` has ``period``)
    charges now: its ``exact_amount`` less the usage its usage-correction notes corrected (``usage_corrected``).
    ``None``: no such line, or an earlier note of it does not say what usage it corrected (issued before session
    11)."""
    found = [item for item in invoice.lines if item["kind"] == "usage" and item.get("meter") == meter
             and period in ((item.get("trace") or {}).get("rating_periods") or [])]
    if len(found) != 1 or Decimal(found[0]["amount"]) <= 0:
        return None
    exact = Decimal(found[0].get("exact_amount") or found[0]["amount"])
    for document in invoice.corrections:
        note = batch.get(UUID(document))
        if not isinstance(note, Invoice):
            continue
        for item in note.lines:
            if item["kind"] == "usage_correction" and item.get("meter") == meter:
                if item.get("usage_corrected") is None:
                    return None
                exact = RATING_CONTEXT.subtract(exact, Decimal(item["usage_corrected"]))
    return exact


def _minimum_headroom(batch: _Batch, invoice: Invoice, period: str, due: Decimal) -> Decimal:
    """For a period whose minimum the account does not remember (``BillingAccount.period_minimum``: committed
    before session 8, or shared by two period keys): what of the usage ``invoice`` billed for ``period`` a correction
    can credit without taking the period's spend
    below the minimum spend it committed (``minimum_spend``; its usage spend counted as its "Minimum commitment" line
    counts it, ``invoice_overage.minimum_commitment_lines``), less what usage-correction notes credited against it
    already: the period owes its minimum whatever its usage. ``due`` when the invoice has no minimum for that period
    (none, or the period is not one its usage lines itemise: overage of earlier periods)."""
    minimum = invoice.minimum_spend
    usage = [item for item in invoice.lines if item["kind"] == "usage"]
    if not minimum or not any(period in ((item.get("trace") or {}).get("rating_periods") or []) for item in usage):
        return due
    spend = usage_spend(invoice.lines)
    for document in invoice.corrections:
        note = batch.get(UUID(document))
        if isinstance(note, Invoice):
            for item in note.lines:
                if item["kind"] == "usage_correction":
                    spend = RATING_CONTEXT.add(spend, Decimal(item["amount"]))
    return max(RATING_CONTEXT.subtract(spend, minimum), Decimal(0))
