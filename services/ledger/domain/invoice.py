"""Invoices and credit notes: draft -> finalized (sequential, gap-free number per issuer) -> paid or void.

Numbers come from an ``InvoiceSequence`` aggregate per issuer and year. Finalizing records the sequence's
next number and the invoice's ``Finalized`` event in ONE transaction: if it fails nothing is recorded (no
gap), and two finalizations racing for the same number conflict on the sequence's version (optimistic
concurrency), so one retries with the next number (no duplicate).

Amounts on lines are decimal strings rounded once per line to what the currency is billed in (half-up, see
``billing_events.money.round_minor``: the minor unit, ten fils of a three-decimal currency, so that a total in KWD
ends in 0 as a card payment must); the total is the sum of the rounded lines.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.money import RATING_CONTEXT, currency, round_minor
from eventsourcing.domain import Aggregate, event

DRAFT, FINALIZED, PAID, VOID = "draft", "finalized", "paid", "void"
INVOICE, CREDIT_NOTE = "invoice", "credit_note"
# ``usage_correction``: a credit note's credit for usage an invoice billed that a correction lowered.
LINE_KINDS = frozenset({"base_fee", "usage", "credits_applied", "overage", "proration", "discount", "tax",
                        "top_up", "adjustment", "minimum_commitment", "usage_correction"})


def invoice_id(tenant: str, key: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/invoices/{tenant}/{key}")


# The key of an invoice of the credit notes' credit usage outside subscription invoices spent in a month
# (``billing_ledger.credit_note_usage_commands``): no subscription, yet billed on the account and collected like one.
CREDIT_NOTE_USAGE_KEY_PREFIX = "credit-note-usage/"


def credit_note_usage_key(month: str, issued: datetime) -> str:
    """That invoice's key: the month (``YYYY-MM``) whose usage it bills and when it was issued (a month's usage that
    arrives after its invoice is billed by another)."""
    return f"{CREDIT_NOTE_USAGE_KEY_PREFIX}{month}/{issued.isoformat()}"


def is_credit_note_usage(invoice: Any) -> bool:
    """Whether ``invoice`` (an ``Invoice``, or a document read like one) bills credit note usage (no subscription)."""
    return invoice.document_type == INVOICE and not invoice.subscription_id \
        and str(invoice.key).startswith(CREDIT_NOTE_USAGE_KEY_PREFIX)


def sequence_id(issuer: str, year: int, prefix: str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/invoice-sequences/{issuer}/{prefix}/{year}")


def line(kind: str, description: str, amount: Decimal, unit: str, *, quantity: str | None = None,
         unit_amount: str | None = None, **extra: Any) -> dict[str, Any]:
    """One invoice line, rounded once to what the currency is billed in (``round_minor``)."""
    if kind not in LINE_KINDS:
        raise InvoiceError(f"unknown line kind {kind!r}")
    rounded = round_minor(amount, currency(unit))
    return {"kind": kind, "description": description, "quantity": quantity, "unit_amount": unit_amount,
            "amount": str(rounded), "exact_amount": str(amount), **extra}


def reversing_lines(invoice: Invoice) -> list[dict[str, Any]]:
    """The lines of a credit note giving back the whole of ``invoice``: its lines negated, with its own tax (a
    0.00 tax line when it had none), so finalizing the note never computes tax anew (the account's tax profile
    may have changed since) and the note credits exactly what the invoice charged."""
    lines = [{**item, "amount": str(-Decimal(item["amount"])), "exact_amount": str(-Decimal(item["exact_amount"]))}
             for item in invoice.lines]
    if not any(item["kind"] == "tax" for item in lines):
        lines.append(line("tax", f"No tax on {invoice.number}", Decimal(0), invoice.currency, rate="0"))
    return lines


class Invoice(Aggregate):
    @staticmethod
    def create_id(tenant: str, key: str) -> UUID:
        return invoice_id(tenant, key)

    @event("Drafted")
    def __init__(self, tenant: str, key: str, document_type: str, currency: str, lines: list[dict[str, Any]],
                 period_start: datetime | None, period_end: datetime | None, subscription_id: str | None,
                 related_invoice: str | None, at: datetime, by: str) -> None:
        self.tenant = tenant
        self.key = key
        self.document_type = document_type
        self.currency = currency
        self.lines = list(lines)
        self.period_start = period_start
        self.period_end = period_end
        self.subscription_id = subscription_id
        self.related_invoice = related_invoice
        self.status = DRAFT
        self.number: str | None = None
        self.minimum_spend: Decimal | None = None  # a renewal draft: the ended period's commitment on usage
        self.pending_payments: dict[str, str] = {}  # dunning attempt -> its pending charge (see payment_pending)
        self.payment: str | None = None  # the reference of the payment that paid it (``Paid``)
        # What of its total the payment did not pay because no gateway charges it (12.957 KWD paid 12.950: 0.007,
        # ``invoice_commands.charge_of``), written off when it was paid (``Paid.written_off``, since session 15): a
        # decimal string. "0" for a payment of the whole total, and for any payment recorded before session 15.
        self.written_off = "0"
        self.failed_payments: dict[str, str] = {}
        # The documents (a change's or cancel's credit note) that credit part of it (``record_correction``).
        self.corrections: list[str] = []
        # What of it was given back since (``record_given_back``: refunds and credits for unused time), net and tax,
        # as decimal strings; refunds and credits recorded before these existed are not in it.
        self.given_back_net = "0"
        self.given_back_tax = "0"
        # Set when finalized: its dates, and who it is billed to and by as they were then (``finalize``).
        self.issued_at: datetime | None = None
        self.due_at: datetime | None = None
        self.billed_to: dict[str, Any] | None = None
        self.seller: dict[str, Any] | None = None

    @property
    def total(self) -> Decimal:
        total = Decimal(0)
        for item in self.lines:
            total = RATING_CONTEXT.add(total, Decimal(item["amount"]))
        return total

    def add_lines(self, lines: list[dict[str, Any]], *, by: str) -> None:
        if self.status != DRAFT:
            raise InvoiceError("lines can only be added to a draft")
        if lines:
            self._lines_added(lines=lines, by=by)

    @event("LinesAdded")
    def _lines_added(self, lines: list[dict[str, Any]], by: str) -> None:
        self.lines.extend(lines)

    def commit_minimum_spend(self, *, amount: Decimal, currency: str, by: str) -> None:
        """A renewal draft records the ended period's minimum spend on usage (``Subscription.period_minimum``);
        the usage lines then bill the shortfall (``billing_ledger.invoice_overage.minimum_commitment_lines``)."""
        if self.status != DRAFT:
            raise InvoiceError("a minimum spend can only be recorded on a draft")
        if currency != self.currency:
            raise InvoiceError(f"minimum spend in {currency}, invoice in {self.currency}")
        if amount > 0:
            self._minimum_committed(amount=str(amount), by=by)

    @event("MinimumSpendCommitted")
    def _minimum_committed(self, amount: str, by: str) -> None:
        self.minimum_spend = Decimal(amount)

    def finalize(self, *, number: str, issued_at: datetime, due_at: datetime, by: str,
                 billed_to: dict[str, Any] | None = None, seller: dict[str, Any] | None = None) -> None:
        """``billed_to``: the customer's tax profile as it is now (business name, country, subdivision, tax id);
        ``seller``: the issuer's name, country and VAT id. Recorded, so that every copy of the document (the
        emailed PDF, a download years later) shows them as they were when it was issued."""
        if self.status != DRAFT:
            raise InvoiceError(f"invoice is {self.status}, not a draft")
        self._finalized(number=number, issued_at=issued_at, due_at=due_at, total=str(self.total), by=by,
                        billed_to=billed_to, seller=seller)

    @event("Finalized")
    def _finalized(self, number: str, issued_at: datetime, due_at: datetime, total: str, by: str,
                   billed_to: dict[str, Any] | None = None, seller: dict[str, Any] | None = None) -> None:
        # billed_to and seller: None on documents finalized before they were recorded (session 12).
        self.status = FINALIZED
        self.number = number
        self.issued_at = issued_at
        self.due_at = due_at
        self.billed_to = billed_to
        self.seller = seller

    def mark_paid(self, *, at: datetime, payment: str, by: str, written_off: Decimal = Decimal(0)) -> None:
        """``written_off``: what of the total the payment leaves unpaid, written off as it pays the rest (a total
        finer than its currency is charged in: less than one step of it, or the whole of a total below one step);
        never negative, never more than the total."""
        if self.status != FINALIZED:
            raise InvoiceError(f"invoice is {self.status}; only a finalized invoice can be paid")
        if written_off < 0 or written_off > self.total:
            raise InvoiceError(f"{written_off} written off of an invoice of {self.total}")
        self._paid(at=at, payment=payment, by=by, **({"written_off": str(written_off)} if written_off else {}))

    @event("Paid")
    def _paid(self, at: datetime, payment: str, by: str, written_off: str | None = None) -> None:
        self.status = PAID
        self.payment = payment
        if written_off is not None:  # recorded since session 15
            self.written_off = written_off

    @property
    def paid_total(self) -> Decimal:
        """What its payment paid: the total less what was written off (``written_off``)."""
        return RATING_CONTEXT.subtract(self.total, Decimal(self.written_off))

    def void(self, *, at: datetime, reason: str, by: str) -> None:
        if self.status not in (DRAFT, FINALIZED):
            raise InvoiceError(f"invoice is {self.status}; it cannot be voided")
        self._voided(at=at, reason=reason, by=by)

    @event("Voided")
    def _voided(self, at: datetime, reason: str, by: str) -> None:
        self.status = VOID

    def record_correction(self, *, document: UUID, by: str) -> None:
        """``document`` (its ``related_invoice`` is this invoice) credits part of what this one billed: a
        change's or an immediate cancel's credit for the unused time. Such an invoice is not voided any more."""
        if str(document) not in self.corrections:
            self._corrected(document=str(document), by=by)

    @event("Corrected")
    def _corrected(self, document: str, by: str) -> None:
        self.corrections = [*self.corrections, document]

    @property
    def given_back(self) -> Decimal:
        """What of this invoice was given back (refunded by the gateway, credited for unused time), tax included."""
        return RATING_CONTEXT.add(Decimal(self.given_back_net), Decimal(self.given_back_tax))

    def record_given_back(self, *, document: UUID, net: Decimal, tax: Decimal, by: str) -> None:
        """``document`` gave back ``net`` and ``tax`` of what this invoice billed: a gateway refund's credit note, or
        a change's or cancel's credit for unused time. Together they never exceed the invoice's total."""
        if net or tax:
            self._given_back(document=str(document), net=str(net), tax=str(tax), by=by)

    @event("GivenBack")
    def _given_back(self, document: str, net: str, tax: str, by: str) -> None:
        self.given_back_net = str(RATING_CONTEXT.add(Decimal(self.given_back_net), Decimal(net)))
        self.given_back_tax = str(RATING_CONTEXT.add(Decimal(self.given_back_tax), Decimal(tax)))

    def restore_given_back(self, *, document: UUID, net: Decimal, tax: Decimal, by: str) -> None:
        """``document``, a change's invoice that netted ``net`` and ``tax`` of credit for this invoice's unused time,
        was voided: that credit is no longer given, so it is taken off what this invoice gave back (never below
        nothing: a credit recorded before ``given_back`` existed is not in it), and a later change or cancel can
        credit that time again, once."""
        net = min(net, Decimal(self.given_back_net))
        tax = min(tax, Decimal(self.given_back_tax))
        if net > 0 or tax > 0:
            self._given_back_restored(document=str(document), net=str(max(net, Decimal(0))),
                                      tax=str(max(tax, Decimal(0))), by=by)

    @event("GivenBackRestored")
    def _given_back_restored(self, document: str, net: str, tax: str, by: str) -> None:
        self.given_back_net = str(RATING_CONTEXT.subtract(Decimal(self.given_back_net), Decimal(net)))
        self.given_back_tax = str(RATING_CONTEXT.subtract(Decimal(self.given_back_tax), Decimal(tax)))

    # A charge of dunning attempt ``attempt`` (1-based) that the gateway left pending, and its failure, by the
    # gateway's payment reference (dunning.py). A charge recorded pending before these existed is not followed.

    def payment_pending(self, *, attempt: int, payment: str, at: datetime, by: str) -> None:
        if self.pending_payments.get(str(attempt)) != payment:
            self._payment_pending(attempt=attempt, payment=payment, at=at, by=by)

    @event("PaymentPending")
    def _payment_pending(self, attempt: int, payment: str, at: datetime, by: str) -> None:
        self.pending_payments = {**self.pending_payments, str(attempt): payment}

    def payment_failed(self, *, payment: str, at: datetime, by: str) -> int | None:
        """The pending ``payment`` failed: its attempt (recorded once), or None when no attempt left it pending."""
        attempt = next((int(k) for k, v in self.pending_payments.items() if v == payment), None)
        if attempt is not None and str(attempt) not in self.failed_payments:
            self._payment_failed(attempt=attempt, payment=payment, at=at, by=by)
        return attempt

    @event("PaymentFailed")
    def _payment_failed(self, attempt: int, payment: str, at: datetime, by: str) -> None:
        self.failed_payments = {**self.failed_payments, str(attempt): payment}

    @property
    def payment_under_way(self) -> bool:
        """A charge left pending whose failure is not recorded: its money may still arrive (its webhook pays)."""
        return any(attempt not in self.failed_payments for attempt in self.pending_payments)


class InvoiceSequence(Aggregate):
    """Gap-free numbers per issuer and year: ``INV-2026-000123`` (credit notes: ``CN-2026-000007``), in the order of
    their issue dates: a number is never dated before the one assigned ahead of it (EU VAT Directive art. 226(2):
    a sequential series; several member states require it chronological). ``issue_date`` says when a document
    numbered now is dated."""

    @staticmethod
    def create_id(issuer: str, year: int, prefix: str) -> UUID:
        return sequence_id(issuer, year, prefix)

    @event("Created")
    def __init__(self, issuer: str, year: int, prefix: str) -> None:
        self.issuer = issuer
        self.year = year
        self.prefix = prefix
        self.last = 0
        # The issue date of the last number (None: none assigned, or only before session 14, which did not record it).
        self.last_issued_at: datetime | None = None

    def issue_date(self, issued_at: datetime) -> datetime:
        """The issue date of the next number for a document issued at ``issued_at``: that, or the last number's date
        when that is later (two commands of one moment, clocks a little apart), so dates never run backwards."""
        if self.last_issued_at is not None and self.last_issued_at > issued_at:
            return self.last_issued_at
        return issued_at

    def next_number(self, *, invoice: UUID, issued_at: datetime | None = None) -> str:
        """The next number, for ``invoice`` dated ``issued_at`` (refused when before the last number's date: take
        ``issue_date``)."""
        if issued_at is not None and self.last_issued_at is not None and issued_at < self.last_issued_at:
            raise InvoiceError(f"{self.prefix}-{self.year}-{self.last + 1:06d} would be dated {issued_at.isoformat()}, "
                               f"before {self.prefix}-{self.year}-{self.last:06d} ({self.last_issued_at.isoformat()})")
        self._assigned(number=self.last + 1, invoice=str(invoice), issued_at=issued_at)
        return f"{self.prefix}-{self.year}-{self.last:06d}"

    @event("NumberAssigned")
    def _assigned(self, number: int, invoice: str, issued_at: datetime | None = None) -> None:
        # ``issued_at``: recorded since session 14 (None before).
        self.last = number
        if issued_at is not None:
            self.last_issued_at = issued_at


class InvoiceError(ValueError):
    pass
