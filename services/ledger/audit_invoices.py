"""The audit's invoice checks (``billing audit verify``): the tenant's subscription documents against its books.

The identities that hold in this ledger's accounting, checked document by document and then for the balance
(docs/ledger.md "Tamper evidence and audit"):

* **An issued invoice makes its total receivable, its tax included.** Its fee lines and tax are posted when it is
  finalized (``InvoiceBilled``: Dr receivables fees + tax); its usage, credits-applied and overage lines bill usage
  that was receivable already (posted with each debit beyond credit), which the invoice takes off the unbilled
  overage (``OverageInvoiced``; less a minimum commitment already billed, ``PeriodMinimumsCharged``; plus the
  rounding of its lines, ``InvoicedOverageRounded``). So its total is what it billed plus the overage it took in its
  currency, and its tax lines are the tax it billed.
* **A paid invoice was cleared by its payment**: ``InvoicePaid`` (its fees and tax) and ``ReceivableSettled`` (its
  overage, in each unit) took exactly what it made receivable out of receivables into the gateway's clearing (less
  the rounding of a total finer than its currency is charged in, written off: ``InvoiceChargeRounded``), and
  it names the payment; a void one gave all of it back (``InvoiceBillVoided``, ``InvoicedOverageReturned``,
  ``InvoicedOverageRoundingReversed``) and was never paid; an open (finalized) one neither.
* **A credit note posts exactly its total and never gives back more than was charged.** A gateway refund's note
  out of the gateway's clearing and its tax from tax payable (``InvoicePaymentRefunded``), any other as account
  credit with its tax (``CreditGranted``, source ``credit_note``). It credits (its total is not positive) and names
  a document of the tenant in its currency. What the documents correcting a document give back (its credit notes,
  and the credit a change's invoice nets for the unused time of the invoice it corrects) is at most what that one
  charged: its total plus the credit it netted itself (``subscription_commands._credit_given``; a change's credit
  note also bills the new plan's rest, which a cancel may credit). A refund's ``reclaimed`` lines took back credit
  given before (a cancel's): not given twice, not counted.
* **Receivables are the open invoices and the overage no invoice bills yet.** Per unit, the ``receivables`` postings
  equal the totals of the finalized, unpaid invoices (in a credit unit: the overage of that unit they took; they bill
  it priced in their currency) plus the account's unbilled overage (``BillingAccount.unbilled_overage``: usage
  beyond credit since the last invoice, what a refund left owed). Not the open invoices alone: usage beyond credit is
  receivable when it is used, before the renewal invoice that bills it.

The documents: every one the account's stream names (billed, paid, voided, refunded, credited) and every period
document of the tenant's subscriptions (the roster's history), with the invoices their credit notes name, each
rebuilt from its own events (never a cache). Top-up invoices and their credit notes (no subscription) post nothing
on the account (the purchase grant and its refund move that money, which the balance checks cover): not checked
here. Streams recorded before these postings existed (an invoice billed before session 5's ``InvoiceBilled``, an
overage invoice before its rounding was posted, a refund's owed excess before session 8) are reported as found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.money import RATING_CONTEXT, to_subunits
from billing_ledger.amounts import show
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import CREDIT_NOTE, DRAFT, FINALIZED, INVOICE, PAID, VOID, Invoice
from billing_ledger.domain.postings import LedgerAccount
from billing_ledger.domain.roster import roster_id
from billing_ledger.subscription_commands import _credit_given

CREDIT_NOTE_SOURCE = "credit_note"


@dataclass
class Posted:
    """What the account's stream posted for one document, in sub-units (per unit where it may be several)."""

    billed: int = 0  # fees + tax made receivable (InvoiceBilled)
    billed_tax: int = 0
    overage: dict[str, int] = field(default_factory=dict)  # the overage it took, with its rounding, net of netting
    paid: int = 0  # its fees + tax cleared (InvoicePaid)
    settled: dict[str, int] = field(default_factory=dict)  # its overage cleared (ReceivableSettled)
    written_off: dict[str, int] = field(default_factory=dict)  # its total's rounding to a charge (InvoiceChargeRounded)
    voided: int = 0  # its fees + tax reversed (InvoiceBillVoided)
    returned: dict[str, int] = field(default_factory=dict)  # its overage owed again (and its rounding taken back)
    refunded: int | None = None  # a gateway refund's credit note: out of clearing (InvoicePaymentRefunded)
    refunded_tax: int = 0
    credited: int | None = None  # any other credit note: account credit (CreditGranted, source credit_note)
    credited_tax: int = 0


class InvoiceBooks:
    """Collects, event by event of the account's stream, what each document posted (``observe``)."""

    def __init__(self) -> None:
        self.documents: dict[str, Posted] = {}

    def _of(self, document: Any) -> Posted:
        return self.documents.setdefault(str(document), Posted())

    def observe(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "InvoiceBilled":
            posted = self._of(event.invoice)
            posted.billed += event.amount
            posted.billed_tax += event.tax_amount
        elif kind == "OverageInvoiced":
            posted = self._of(event.invoice)
            for unit, periods in event.taken.items():
                # As the account keeps it: a unit taken net negative leaves nothing to collect.
                posted.overage[unit] = max(posted.overage.get(unit, 0) + sum(periods.values()), 0)
        elif kind == "InvoicedOverageRounded":
            _add(self._of(event.invoice).overage, event.unit, event.amount)
        elif kind == "PeriodMinimumsCharged":
            _add(self._of(event.invoice).overage, event.unit, -sum(p["netted"] for p in event.periods.values()))
        elif kind == "InvoicePaid":
            self._of(event.invoice).paid += event.amount
        elif kind == "InvoiceChargeRounded":
            _add(self._of(event.invoice).written_off, event.unit, event.amount)
        elif kind == "ReceivableSettled" and isinstance(event.cause, dict) and event.cause.get("invoice"):
            _add(self._of(event.cause["invoice"]).settled, event.unit, event.amount)
        elif kind == "InvoiceBillVoided":
            self._of(event.invoice).voided += event.amount
        elif kind == "InvoicedOverageRoundingReversed":
            _add(self._of(event.invoice).returned, event.unit, event.amount)
        elif kind == "InvoicedOverageReturned":
            for unit, amount in event.returned.items():
                _add(self._of(event.invoice).returned, unit, amount)
        elif kind == "InvoicePaymentRefunded":
            posted = self._of(event.note)
            posted.refunded = (posted.refunded or 0) + event.amount
            posted.refunded_tax += event.tax_amount
        elif kind == "CreditGranted" and event.source == CREDIT_NOTE_SOURCE and isinstance(event.cause, dict) \
                and event.cause.get("credit_note"):
            posted = self._of(event.cause["credit_note"])
            posted.credited = (posted.credited or 0) + event.amount
            posted.credited_tax += int(event.cause.get("tax") or 0)


def _add(amounts: dict[str, int], unit: str, amount: int) -> None:
    amounts[unit] = amounts.get(unit, 0) + amount


def invoice_problems(app: LedgerApplication, tenant: str, account: BillingAccount, books: InvoiceBooks,
                     ledger: dict[tuple[str, str], int]) -> tuple[int, list[str]]:
    """The documents checked and every mismatch (see the module doc); ``account`` replayed from its events and
    ``ledger`` its postings summed per (ledger account, unit)."""
    problems: list[str] = []
    documents = _documents(app, tenant, books, problems)
    open_totals: dict[str, list[tuple[str, int]]] = {}
    given: dict[str, list[tuple[Invoice, Decimal]]] = {}
    for document in documents.values():
        if not document.subscription_id or document.status == DRAFT or document.number is None:
            continue  # a top-up's (posts nothing here), a draft, or a period with nothing to bill (never numbered)
        posted = books.documents.get(str(document.id), Posted())
        if document.document_type == INVOICE:
            made = _check_invoice(document, posted, problems)
            if document.status == FINALIZED:  # owed: its total, and in a credit unit the overage of it it took
                made[document.currency] = to_subunits(document.total)
                for unit, amount in made.items():
                    if amount:
                        open_totals.setdefault(unit, []).append((_name(document), amount))
        else:
            _check_credit_note(document, posted, problems)
        if document.related_invoice and document.status != VOID:
            back = _given_back(document, posted)
            if back:
                given.setdefault(document.related_invoice, []).append((document, back))
    for invoice_id, documents_giving in given.items():
        _check_given_back(documents.get(invoice_id), invoice_id, tenant, documents_giving, problems)
    _check_receivables(account, ledger, open_totals, problems)
    return len(documents), problems


def _documents(app: LedgerApplication, tenant: str, books: InvoiceBooks, problems: list[str]) -> dict[str, Invoice]:
    """The tenant's documents: those the account's stream names (one missing is a problem), its subscriptions'
    period documents, and the invoices their documents correct."""
    found: dict[str, Invoice] = {}
    named = set(books.documents)
    wanted = [*sorted(named), *_subscription_documents(app, tenant)]
    while wanted:
        key = wanted.pop()
        if key in found:
            continue
        document = _rebuilt(app, UUID(key)) if _is_uuid(key) else None
        if not isinstance(document, Invoice) or document.tenant != tenant:
            if key in named:
                problems.append(f"the account's postings name document {key}, which is not one of tenant {tenant}'s "
                                "invoices or credit notes")
            continue
        found[key] = document
        if document.related_invoice:
            wanted.append(document.related_invoice)
    return found


def _subscription_documents(app: LedgerApplication, tenant: str) -> list[str]:
    """Every document that billed a period of one of the tenant's subscriptions (each ``period_invoice`` it had)."""
    subscriptions = [event.subscription_id for event in app.events.get(roster_id(tenant))
                     if type(event).__name__ == "SubscriptionAdmitted"]
    documents: list[str] = []
    for subscription in dict.fromkeys(s for s in subscriptions if _is_uuid(s)):
        state: Any = None
        for event in app.events.get(UUID(subscription)):
            state = event.mutate(state)
            if state is not None and state.period_invoice and state.period_invoice not in documents:
                documents.append(state.period_invoice)
    return documents


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


def _rebuilt(app: LedgerApplication, aggregate_id: UUID) -> Any:
    aggregate: Any = None
    for event in app.events.get(aggregate_id):
        aggregate = event.mutate(aggregate)
    return aggregate


def _name(document: Invoice) -> str:
    kind = "credit note" if document.document_type == CREDIT_NOTE else "invoice"
    return f"{kind} {document.number} ({document.id})"


def _tax(document: Invoice) -> Decimal:
    return sum((Decimal(item["amount"]) for item in document.lines if item["kind"] == "tax"), Decimal(0))


def _money(subunits: int, tax: int, unit: str) -> str:
    return f"{show(subunits, unit)} {unit} (net {show(subunits - tax, unit)}, tax {show(tax, unit)})"


def _check_invoice(invoice: Invoice, posted: Posted, problems: list[str]) -> dict[str, int]:
    """An invoice's total and tax against what it made receivable, and what its payment or void did with it;
    returns what it made receivable, per unit."""
    unit = invoice.currency
    total, tax = to_subunits(invoice.total), to_subunits(_tax(invoice))
    made = {u: amount for u, amount in posted.overage.items() if u != unit}
    made[unit] = posted.billed + posted.overage.get(unit, 0)
    if (made[unit], posted.billed_tax) != (total, tax):
        problems.append(f"{_name(invoice)} bills {_money(total, tax, unit)}, but made receivable "
                        f"{_money(made[unit], posted.billed_tax, unit)}")
    cleared = {u: posted.settled.get(u, 0) + posted.written_off.get(u, 0) + (posted.paid if u == unit else 0)
               for u in made}
    reversed_ = {u: posted.returned.get(u, 0) + (posted.voided if u == unit else 0) for u in made}
    for u in sorted(made):
        if invoice.status == PAID and (cleared[u] != made[u] or reversed_[u]):
            problems.append(f"{_name(invoice)} is paid, but its payment cleared {show(cleared[u], u)} {u} of the "
                            f"{show(made[u], u)} {u} it made receivable" + _reversed(reversed_[u], u))
        elif invoice.status == VOID and (reversed_[u] != made[u] or cleared[u]):
            problems.append(f"{_name(invoice)} is void, but {show(reversed_[u], u)} {u} of the {show(made[u], u)} {u} "
                            "it made receivable was reversed" + (f" and {show(cleared[u], u)} {u} cleared as paid"
                                                                  if cleared[u] else ""))
        elif invoice.status == FINALIZED and (cleared[u] or reversed_[u]):
            problems.append(f"{_name(invoice)} is open (unpaid), but {show(cleared[u], u)} {u} of it was cleared as "
                            f"paid" + _reversed(reversed_[u], u))
    if invoice.status == PAID and not invoice.payment:
        problems.append(f"{_name(invoice)} is paid, but names no payment")
    return made


def _reversed(amount: int, unit: str) -> str:
    return f" and {show(amount, unit)} {unit} reversed as void" if amount else ""


def _check_credit_note(note: Invoice, posted: Posted, problems: list[str]) -> None:
    """A credit note credits, and posted exactly its total and tax (a refund's out of clearing, else credit)."""
    unit = note.currency
    credit, tax = to_subunits(-note.total), to_subunits(-_tax(note))
    if credit < 0:
        problems.append(f"{_name(note)} bills {show(-credit, unit)} {unit}: a credit note only credits")
    if posted.refunded is not None:
        found, found_tax, how = posted.refunded, posted.refunded_tax, "refunded out of the gateway's clearing"
    else:
        found, found_tax, how = posted.credited or 0, posted.credited_tax, "credited to the account"
    if (found, found_tax) != (credit, tax):
        problems.append(f"{_name(note)} credits {_money(credit, tax, unit)}, but {_money(found, found_tax, unit)} "
                        f"was {how}")


def _given_back(document: Invoice, posted: Posted) -> Decimal:
    """What ``document`` gives back of the invoice it names: a gateway refund's note all its lines but the
    ``reclaimed`` ones (credit given before, taken back), any other document the credit it gives (its credit lines
    and their tax, ``_credit_given``)."""
    if posted.refunded is not None:
        return -sum((Decimal(item["amount"]) for item in document.lines if not item.get("reclaimed")), Decimal(0))
    net, tax = _credit_given(document)
    return RATING_CONTEXT.add(net, tax)


def _check_given_back(invoice: Invoice | None, invoice_id: str, tenant: str,
                      documents: list[tuple[Invoice, Decimal]], problems: list[str]) -> None:
    """The documents correcting ``invoice`` name a document of the tenant in their currency and, together, never
    give back more than it charged (its total and the credit it netted itself: a change's credit note may bill a new
    plan's rest, which a later cancel credits): it is never below zero."""
    names = ", ".join(f"{_name(d)} {back}" for d, back in documents)
    if invoice is None:
        problems.append(f"{names} correct{'s' if len(documents) == 1 else ''} document {invoice_id}, which is not "
                        f"one of tenant {tenant}'s invoices or credit notes")
        return
    for document, _ in documents:
        if document.currency != invoice.currency:
            problems.append(f"{_name(document)} in {document.currency} corrects {_name(invoice)} in "
                            f"{invoice.currency}")
    if invoice.status == DRAFT:
        # A renewal not finalized yet (rating's usage lines not in): a change's or cancel's credit is pending on it and
        # settled against its fee when it is billed, which is checked then.
        return
    if invoice.status == VOID and any(d.document_type == CREDIT_NOTE for d, _ in documents):
        problems.append(f"{_name(invoice)} is void, yet {names} give{'s' if len(documents) == 1 else ''} part of it "
                        "back")
        return
    back = sum((amount for _, amount in documents), Decimal(0))
    netted, netted_tax = _credit_given(invoice)
    charged = RATING_CONTEXT.add(invoice.total, RATING_CONTEXT.add(netted, netted_tax))
    if back > charged:
        problems.append(f"{_name(invoice)} charged {charged} {invoice.currency}, but the documents correcting it give "
                        f"back {back} {invoice.currency} ({names}): {RATING_CONTEXT.subtract(back, charged)} below zero")


def _check_receivables(account: BillingAccount, ledger: dict[tuple[str, str], int],
                       open_totals: dict[str, list[tuple[str, int]]], problems: list[str]) -> None:
    """Per unit: the receivables postings = the open invoices' totals + the overage no invoice bills yet."""
    receivables = LedgerAccount.RECEIVABLES.value
    units = {u for (a, u) in ledger if a == receivables} | set(open_totals)
    for unit in sorted(units):
        found = ledger.get((receivables, unit), 0)
        invoices = open_totals.get(unit, [])
        unbilled = sum(account.unbilled_overage(unit).values())
        expected = sum(amount for _, amount in invoices) + unbilled
        if found != expected:
            listed = ", ".join(f"{name} {show(amount, unit)}" for name, amount in invoices) or "none"
            problems.append(f"{unit} receivables are {show(found, unit)} in the postings, but the open invoices "
                            f"({listed}) and the overage no invoice bills yet ({show(unbilled, unit)}) come to "
                            f"{show(expected, unit)}: {show(found - expected, unit)} unexplained")

