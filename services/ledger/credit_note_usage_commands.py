"""Invoices of the credit notes' credit that usage no subscription invoice bills spent: ``invoice.credit_note_usage``.

A credit note's account credit (a downgrade's or cancel's credit for unused time, a usage correction's) is money
given back *with its tax*: a means of payment, not a discount. The usage it pays is a supply like any other and bears
VAT: a subscription invoice billing that usage taxes it and applies the credit after tax, on a line of its own
(session 14, ``invoice_overage.overage_lines``). Usage that no subscription invoice bills got no invoice at all, so
the services that credit paid were never taxed: an account without a live subscription (rating prices its usage by
calendar month, ``cause.period`` ``YYYY-MM``: pay as you go, after a cancel) and captured holds (rating's usage lines
never show them). A cancel's 119.00 of credit (100.00 + 19.00 of VAT given back) spent on 100.00 of usage left 19.00
of VAT uncollected (session 15).

At the first sweep after a calendar month (UTC) ends, the sweeper (``billing_ledger.sweeper``) sends this command for
every account where such usage drew that credit in the month (``BillingAccount.credit_note_usage_due``). Per month it
issues one invoice (key ``credit-note-usage/{month}/{now}``, ``credit_note_usage_key``; no subscription, the calendar
month as its service period), as a renewal bills the same usage:

* a ``usage`` line: the credit drawn by the month's usage and captures ("Usage in November 2026 paid with credit note
  credit", the captures' part named), rounded once;
* the tax at the tenant's rate, by its tax profile and the catalogue's rules (``document_tax_lines``, as every
  invoice; none, a reverse charge or an export: no VAT);
* "Credit note credit applied (a payment, after tax)": the usage line's amount, ``after_tax`` (not in the taxable
  net), shown below the tax.

Its total is the tax: made receivable (``BillingAccount.bill_invoice``: Dr ``receivables`` / Cr ``tax_payable``,
``InvoiceBilled``), emailed and collected like a subscription invoice (dunning), settled when paid
(``InvoicePaid``). An invoice of 0.00 (no tax) is settled as it is issued (payment ``nothing_due``). The usage itself
was posted when it drew the credit (Dr ``tenant_wallet`` / Cr ``recognised_revenue``): nothing else moves, and the
revenue report is unchanged (usage recognised from the wallet; the tax is no revenue).

Each sub-unit of that credit is billed once: the account forgets what an invoice applies
(``BillingAccount.apply_credit_note_credit``, ``CreditNoteCreditApplied``), whichever invoice takes it first. A
subscription period's spend (an ISO 8601 key) is left to its subscription's invoices. A calendar month's that a renewal
also itemises (usage rated before rating knew of the subscription) is billed by whichever comes first: taken here,
the renewal shows that usage paid by prepaid credit, before tax, its VAT on this invoice. Top-up credit (its VAT paid
at purchase), a plan's credit (part of its taxed fee) and promotional credit are not counted: nothing to invoice.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from billing_events.messages import LedgerCommand
from billing_events.money import currency, from_subunits, round_minor, to_subunits
from billing_ledger import payload
from billing_ledger.account_commands import account_of
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.account import HOLD_SPEND_KEY_PREFIX, BillingAccount
from billing_ledger.domain.invoice import INVOICE, Invoice, credit_note_usage_key, line
from billing_ledger.invoice_overage import CREDIT_NOTE_CREDIT_APPLIED
from billing_ledger.limits import EFFECTIVE_AT_SKEW_SECONDS_MAX
from billing_ledger.subscription_commands import _finalize, _settle_nothing_due, _tenant


@handles("invoice.credit_note_usage")
def invoice_credit_note_usage(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> dict[str, Any]:
    """The invoices of the months ended by ``now`` (the payload's, default the command's time) whose credit notes'
    credit usage no subscription invoice bills spent (``BillingAccount.credit_note_usage``); none when nothing is
    due (a second run, another ledger process)."""
    tenant = _tenant(command)
    account = account_of(batch, tenant)
    now = payload.timestamp(command, "now", default=command.issued_at)
    if now > command.issued_at + timedelta(seconds=EFFECTIVE_AT_SKEW_SECONDS_MAX):
        # A month is invoiced once it has ended, never ahead of the clock (its usage still to come).
        raise CommandRejected(payload.AT_OUT_OF_RANGE, f"now {now.isoformat()} is after the command was issued "
                                                       f"({command.issued_at.isoformat()})")
    issued = []
    for unit, months in sorted(account.credit_note_usage(now).items()):
        for month, keys in sorted(months.items()):
            invoice = _issue(app, batch, account, unit, month, keys, now, command.issued_by)
            issued.append({"invoice_id": str(invoice.id), "number": invoice.number, "month": month,
                           "total": str(invoice.total), "status": invoice.status})
    return {"invoices": issued}


def _issue(app: LedgerApplication, batch: _Batch, account: BillingAccount, unit: str, month: str,
           keys: dict[str, int], now: datetime, by: str) -> Invoice:
    """The invoice of ``month``'s spend ``keys`` (spend key -> sub-units) in ``unit``, finalized and booked."""
    start = datetime(int(month[:4]), int(month[5:]), 1, tzinfo=UTC)
    end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    invoice = Invoice(tenant=account.tenant, key=credit_note_usage_key(month, now), document_type=INVOICE,
                      currency=unit, lines=[], period_start=start, period_end=end, subscription_id=None,
                      related_invoice=None, at=now, by=by)
    batch.add(invoice)
    spent = account.apply_credit_note_credit(invoice=str(invoice.id), unit=unit, periods=keys, at=now)
    held = sum(amount for key, amount in keys.items() if key.startswith(HOLD_SPEND_KEY_PREFIX))
    scale = currency(unit)
    what = f"Usage in {start:%B %Y} paid with credit note credit"
    if held:
        what += f" (of it {round_minor(from_subunits(held), scale)} {unit} of holds captured)"
    usage = line("usage", what, from_subunits(spent), unit, periods=sorted(keys))
    invoice.add_lines([usage], by=by)
    paid = line("credits_applied", CREDIT_NOTE_CREDIT_APPLIED, -Decimal(usage["amount"]), unit, after_tax=True)
    _finalize(app, batch, invoice, now, by, after_tax=[paid])
    tax = sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] == "tax"), Decimal(0))
    cause = {"invoice": str(invoice.id), "invoice_number": invoice.number, "credit_note_usage": month}
    account.bill_invoice(invoice=str(invoice.id), unit=unit, net=0, tax=to_subunits(tax), at=now, cause=cause)
    if invoice.total == 0:
        _settle_nothing_due(batch, invoice, now, by)
    return invoice
