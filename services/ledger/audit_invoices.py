"""The audit's invoice checks (``billing audit verify``, and ``billing audit replay`` of an export): the tenant's
invoices and credit notes, their arithmetic and their tax, against its books.

Each document is read from its events' export records (``Document.of``: the same JSON an export line carries,
``billing_ledger.audit.to_record``), so the checks run alike on the event store and, offline, on an export file.
Every finalized document's arithmetic is re-derived from its lines: each line rounded once to what its currency is
billed in (its ``exact_amount`` rounded half-up, when it has one), the total the sum of the lines and the total
recorded when it was finalized, and each tax line that names its ``rate`` that rate of its net (the lines not
``tax_included``, rounded once, then taxed and rounded once: ``compute_tax``; a change's credit taxed at the rate of
the invoice it corrects, a line naming that ``invoice``, is that rate of the credit). A top-up's invoice bills what
its purchase grant recorded as paid (``CreditGranted`` source ``purchase``: the order's ``total`` and ``tax``), and
the credit note of its refund mirrors it.

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
  given before (a cancel's): not given twice, not counted; its ``written_off`` line (the refund of all an invoice
  was paid, 12.950 of 12.957 KWD) shows what the payment never paid: the note gives the whole invoice back.
* **Credit notes' credit applied after tax is what the account applied.** An invoice's ``after_tax`` lines apply at
  most the credit notes' credit the account forgot for it (``CreditNoteCreditApplied``), rounded once; a month's
  credit note usage invoice (``credit_note_usage_commands``, since session 15: no subscription, its tax made
  receivable like a subscription invoice's) bills exactly that credit's usage and applies all of it.
* **Receivables are the open invoices and the overage no invoice bills yet.** Per unit, the ``receivables`` postings
  equal the totals of the finalized, unpaid invoices (in a credit unit: the overage of that unit they took; they bill
  it priced in their currency) plus the account's unbilled overage (``BillingAccount.unbilled_overage``: usage
  beyond credit since the last invoice, what a refund left owed). Not the open invoices alone: usage beyond credit is
  receivable when it is used, before the renewal invoice that bills it.

The documents (``stored_documents``): every one the account's stream names (billed, paid, voided, refunded,
credited), every period document of the tenant's subscriptions (the roster's history), the invoices of its top-ups
and their refunds' credit notes (the orders its purchase grants name), with the invoices their credit notes name,
each read from its own events (never a cache). Top-up invoices and their credit notes (no subscription, and no credit
note usage invoice) post nothing
on the account (the purchase grant and its refund move that money, which the balance checks cover): only their
arithmetic, tax and purchase are checked. Streams recorded before these postings existed (an invoice billed before
session 5's ``InvoiceBilled``, an overage invoice before its rounding was posted, a refund's owed excess before
session 8) are reported as found. The receivables identity needs the account's unbilled overage, which only the
domain model keeps: ``verify`` checks it, the offline replay of an export cannot (``account`` None).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events.money import (
    INVOICE_ROUNDING,
    RATING_CONTEXT,
    MoneyError,
    Unit,
    currency,
    from_subunits,
    is_billable,
    round_minor,
    to_subunits,
)
from billing_ledger.amounts import show
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import (
    CREDIT_NOTE,
    DRAFT,
    FINALIZED,
    INVOICE,
    PAID,
    VOID,
    Invoice,
    invoice_id,
    is_credit_note_usage,
)
from billing_ledger.domain.postings import LedgerAccount
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.tax import percent_text
from billing_ledger.subscription_commands import _credit_given

CREDIT_NOTE_SOURCE = "credit_note"
PURCHASE_SOURCE = "purchase"
# A document's events (``Invoice.<name>``) and what each changes of what the checks read; the others change nothing
# of it. A type not here is one this code does not know: reported, the document not checked.
DOCUMENT_EVENT_PREFIX = "Invoice."
DOCUMENT_EVENTS = frozenset({"Drafted", "LinesAdded", "Finalized", "Paid", "Voided", "MinimumSpendCommitted",
                             "Corrected", "GivenBack", "GivenBackRestored", "PaymentPending", "PaymentFailed"})


class DocumentUnreadable(ValueError):
    """A document's records do not make a document: not from version 1 in order, not drafted first, an event type
    this code does not know."""


@dataclass
class Document:
    """An invoice or credit note as its events' records tell it (``of``): the attributes of ``Invoice`` the checks
    read, and the total its ``Finalized`` recorded."""

    id: str
    tenant: str
    key: str
    document_type: str
    currency: str
    lines: list[dict[str, Any]]
    subscription_id: str | None
    related_invoice: str | None
    status: str = DRAFT
    number: str | None = None
    payment: str | None = None
    finalized_total: str | None = None

    @property
    def total(self) -> Decimal:
        total = Decimal(0)
        for item in self.lines:
            total = RATING_CONTEXT.add(total, Decimal(item["amount"]))
        return total

    @classmethod
    def of(cls, records: Sequence[Mapping[str, Any]]) -> Document:
        """The document ``records`` (its events' export records, in version order) make, or DocumentUnreadable."""
        document: Document | None = None
        for expected, record in enumerate(records, start=1):
            kind = str(record.get("type", ""))
            name = kind.removeprefix(DOCUMENT_EVENT_PREFIX)
            data = record.get("data") or {}
            if record.get("version") != expected:
                raise DocumentUnreadable(f"version {record.get('version')} ({kind}) where {expected} was expected: "
                                         "an event is missing or moved")
            if not kind.startswith(DOCUMENT_EVENT_PREFIX) or name not in DOCUMENT_EVENTS:
                raise DocumentUnreadable(f"version {expected} is a {kind}, not an event of an invoice this audit "
                                         "knows (a newer version of this repository may)")
            if (name == "Drafted") != (document is None):
                raise DocumentUnreadable(f"version {expected} is a {kind}: a document is drafted first, once")
            if name == "Drafted":
                document = cls(str(record["aggregate_id"]), str(data["tenant"]), str(data["key"]),
                               str(data["document_type"]), str(data["currency"]), list(data["lines"]),
                               data.get("subscription_id"), data.get("related_invoice"))
                continue
            assert document is not None
            if name == "LinesAdded":
                document.lines = [*document.lines, *data["lines"]]
            elif name == "Finalized":
                document.status, document.number = FINALIZED, data["number"]
                document.finalized_total = data.get("total")
            elif name == "Paid":
                document.status, document.payment = PAID, data["payment"]
            elif name == "Voided":
                document.status = VOID
        if document is None:
            raise DocumentUnreadable("no events")
        return document


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
    # Credit notes' credit the account applied on it after tax (CreditNoteCreditApplied, since session 14), per unit
    notes_applied: dict[str, int] = field(default_factory=dict)


class InvoiceBooks:
    """Collects, event by event of the account's stream, what each document posted (``observe`` a domain event,
    ``observe_record`` its export record), and what each top-up order's purchase grant recorded as paid."""

    def __init__(self) -> None:
        self.documents: dict[str, Posted] = {}
        # order id -> (the total paid, its tax), as the order's purchase grant recorded them (decimal strings)
        self.top_ups: dict[str, tuple[str, str]] = {}

    def _of(self, document: Any) -> Posted:
        return self.documents.setdefault(str(document), Posted())

    def observe(self, event: Any) -> None:
        self._observe(type(event).__name__, event)

    def observe_record(self, record: Mapping[str, Any]) -> None:
        """An account event's export record (its ``data`` holds the event's attributes, in their JSON form)."""
        self._observe(str(record["type"]).rsplit(".", 1)[-1], _Attributes(record["data"]))

    def _observe(self, kind: str, event: Any) -> None:
        if kind == "CreditGranted" and event.source == PURCHASE_SOURCE and isinstance(event.cause, dict) \
                and event.cause.get("order_id") and event.cause.get("total") is not None:
            self.top_ups.setdefault(str(event.cause["order_id"]), (str(event.cause["total"]),
                                                                  str(event.cause.get("tax") or "0")))
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
        elif kind == "CreditNoteCreditApplied":
            _add(self._of(event.invoice).notes_applied, event.unit, sum(event.taken.values()))
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


class _Attributes:
    """An export record's ``data`` read as the event's attributes (``data.amount`` for ``event.amount``)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None


def _add(amounts: dict[str, int], unit: str, amount: int) -> None:
    amounts[unit] = amounts.get(unit, 0) + amount


def invoice_problems(app: LedgerApplication, tenant: str, account: BillingAccount, books: InvoiceBooks,
                     ledger: dict[tuple[str, str], int],
                     records: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[int, list[str]]:
    """``verify``'s checks of the documents in the store: ``records`` are their events' export records (by document
    id, ``stored_documents``), each read as the export reads it and, here, compared with the domain model's document
    (so the offline reading cannot drift from it); then ``check_documents`` with the account replayed from its
    events (``account``) and its postings summed per (ledger account, unit) (``ledger``)."""
    documents, problems = read_documents(tenant, records)
    for document in documents.values():
        problems += _drift(app, document)
    return len(documents), problems + check_documents(tenant, documents, books, ledger, account)


def read_documents(tenant: str, records: Mapping[str, Sequence[Mapping[str, Any]]]
                   ) -> tuple[dict[str, Document], list[str]]:
    """The documents ``records`` make (by id), and a problem for each that does not make one or is another
    tenant's."""
    documents: dict[str, Document] = {}
    problems: list[str] = []
    for key, stream in records.items():
        try:
            document = Document.of(stream)
        except (DocumentUnreadable, KeyError, TypeError) as exc:
            problems.append(f"document {key} cannot be read: {exc}")
            continue
        if document.tenant != tenant:
            problems.append(f"{_name(document)} is tenant {document.tenant}'s, not tenant {tenant}'s")
            continue
        documents[key] = document
    return documents, problems


def check_documents(tenant: str, documents: Mapping[str, Document], books: InvoiceBooks,
                    ledger: dict[tuple[str, str], int], account: BillingAccount | None = None) -> list[str]:
    """Every check of the module doc on ``documents`` (the tenant's, by id) against the books of its account's
    stream; the receivables identity only with ``account`` (the domain model's unbilled overage)."""
    problems = [f"the account's postings name document {key}, which is not one of tenant {tenant}'s invoices or "
                "credit notes" for key in sorted(books.documents) if key not in documents]
    open_totals: dict[str, list[tuple[str, int]]] = {}
    given: dict[str, list[tuple[Document, Decimal]]] = {}
    for document in documents.values():
        if document.status == DRAFT or document.number is None:
            continue  # a draft, or a period with nothing to bill (never numbered): nothing issued to check
        _check_arithmetic(document, problems)
        if not document.subscription_id and not is_credit_note_usage(document):
            _check_top_up(document, documents, books, problems)
            continue  # a top-up's documents post nothing on the account
        posted = books.documents.get(document.id, Posted())
        if document.document_type == INVOICE:
            made = _check_invoice(document, posted, problems)
            _check_notes_applied(document, posted, problems)
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
    for corrected, documents_giving in given.items():
        _check_given_back(documents.get(corrected), corrected, tenant, documents_giving, problems)
    if account is not None:
        _check_receivables(account, ledger, open_totals, problems)
    return problems


def stored_documents(app: LedgerApplication, tenant: str, books: InvoiceBooks) -> dict[str, list[Any]]:
    """The tenant's documents in the store (see the module doc), each as its stored events in version order, by
    id: those the account's stream names, its subscriptions' period documents, its top-up orders' invoices and
    refund credit notes, and the invoices their documents correct. Another tenant's, or not a document: left out
    (a named one is then reported missing by ``check_documents``)."""
    found: dict[str, list[Any]] = {}
    orders = [str(invoice_id(tenant, f"orders/{order}{refund}")) for order in books.top_ups
              for refund in ("", "/refund")]
    wanted = [*orders, *_subscription_documents(app, tenant), *sorted(books.documents)]
    seen: set[str] = set()
    while wanted:
        key = wanted.pop()
        if key in seen or not _is_uuid(key):
            continue
        seen.add(key)
        events = list(app.events.get(UUID(key)))
        first = events[0] if events else None
        if type(first).__qualname__ != "Invoice.Drafted" or getattr(first, "tenant", None) != tenant:
            continue
        found[key] = events
        if first.related_invoice:  # type: ignore[union-attr]
            wanted.append(str(first.related_invoice))  # type: ignore[union-attr]
    return found


def _drift(app: LedgerApplication, document: Document) -> list[str]:
    """``document`` as the export reads it must be the domain model's document (``Invoice``) in what the checks read:
    a new kind of document event this module does not follow is found here, not by a wrong finding."""
    model = _rebuilt(app, UUID(document.id))
    read = (document.status, document.number, document.total, document.lines, document.payment,
            document.related_invoice, document.subscription_id, document.document_type, document.currency)
    if not isinstance(model, Invoice) or read != (model.status, model.number, model.total, model.lines, model.payment,
                                                  model.related_invoice, model.subscription_id, model.document_type,
                                                  model.currency):
        return [(f"{_name(document)} reads otherwise from its events' records than in the domain model: the audit "
                "does not follow one of its events (billing_ledger.audit_invoices.Document)")]
    return []


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


def _check_arithmetic(document: Document, problems: list[str]) -> None:
    """Each line rounded once to what the currency is billed in, the total its lines' sum and the one recorded when
    it was finalized, each tax line with a ``rate`` that rate of its net (see the module doc)."""
    try:
        unit = currency(document.currency)
    except MoneyError as exc:
        problems.append(f"{_name(document)}: {exc}")
        return
    rounded = _rounding(document, unit)
    for index, item in enumerate(document.lines, start=1):
        amount = Decimal(item["amount"])
        exact = item.get("exact_amount")
        if rounded(amount) != amount or (exact is not None and rounded(Decimal(exact)) != amount):
            problems.append(f"{_name(document)} line {index} ({item['kind']}) bills {amount} {document.currency}: not "
                            + (f"its exact amount {exact} rounded once" if exact is not None else
                               f"in whole minor units of {document.currency}"))
    total = document.total
    if document.finalized_total is not None and Decimal(document.finalized_total) != total:
        problems.append(f"{_name(document)} was finalized for {document.finalized_total} {document.currency}, but "
                        f"its lines add up to {total}")
    # Taxed as ``document_tax_lines`` taxes: not tax lines, not amounts with their tax included, not a means of
    # payment applied after tax (``after_tax``: a credit note's credit, since session 14).
    lines = [item for item in document.lines
             if item["kind"] != "tax" and not item.get("tax_included") and not item.get("after_tax")]
    net = sum((Decimal(item["amount"]) for item in lines), Decimal(0))
    credited = sum((Decimal(item["amount"]) for item in lines if Decimal(item["amount"]) < 0), Decimal(0))
    taxes = [item for item in document.lines if item["kind"] == "tax" and item.get("rate") is not None]
    at_invoiced_rate = any(item.get("invoice") for item in taxes)
    for item in taxes:
        rate = Decimal(str(item["rate"]))
        if item.get("invoice"):  # a change's credit, at the rate of the invoice it corrects
            base, expected = credited, rounded(RATING_CONTEXT.multiply(credited, rate))
        else:  # the net (less that credit when it has a line of its own), rounded once, then taxed
            base = rounded(RATING_CONTEXT.subtract(net, credited) if at_invoiced_rate else net)
            expected = rounded(RATING_CONTEXT.multiply(base, rate))
        if Decimal(item["amount"]) != expected:
            problems.append(f"{_name(document)} charges {item['amount']} {document.currency} of tax at "
                            f"{percent_text(rate)} % of {base}, which is {expected}")


def _rounding(document: Document, unit: Unit) -> Callable[[Decimal], Decimal]:
    """How ``document``'s amounts were rounded once: to what its currency is billed in (``round_minor``), or, for a
    document of a three-decimal currency finalized before those were billed in hundredths (session 13: a line of
    ``0.617`` KWD), to the currency's own minor digits; its charge's rounding was written off when it was paid
    (``InvoiceChargeRounded``). A document with any line finer than the billed step is checked at the finer scale."""
    if unit.minor_scale > unit.billed_scale and any(not is_billable(Decimal(item["amount"]), unit)
                                                    for item in document.lines):
        step = Decimal(1).scaleb(-unit.minor_scale)
        return lambda amount: amount.quantize(step, rounding=INVOICE_ROUNDING, context=RATING_CONTEXT)
    return lambda amount: round_minor(amount, unit)


def _tax_of(document: Document) -> Decimal:
    return sum((Decimal(item["amount"]) for item in document.lines if item["kind"] == "tax"), Decimal(0))


def _check_top_up(document: Document, documents: Mapping[str, Document], books: InvoiceBooks,
                  problems: list[str]) -> None:
    """A top-up's invoice bills what its purchase grant recorded as paid; its refund's credit note mirrors it."""
    order, _, rest = document.key.removeprefix("orders/").partition("/")
    if not document.key.startswith("orders/") or order not in books.top_ups or rest not in ("", "refund"):
        return
    paid, tax = books.top_ups[order]
    if rest == "":
        if (document.total, _tax_of(document)) != (Decimal(paid), Decimal(tax)):
            problems.append(f"{_name(document)} bills {document.total} {document.currency} (tax {_tax_of(document)}), "
                            f"but its purchase recorded {paid} paid (tax {tax})")
        return
    invoice = documents.get(str(document.related_invoice))
    if invoice is not None and (document.total, _tax_of(document)) != (-invoice.total, -_tax_of(invoice)):
        problems.append(f"{_name(document)} credits {-document.total} {document.currency} (tax {-_tax_of(document)}) "
                        f"of {_name(invoice)}, which billed {invoice.total} (tax {_tax_of(invoice)})")


def _name(document: Document | Invoice) -> str:
    kind = "credit note" if document.document_type == CREDIT_NOTE else "invoice"
    return f"{kind} {document.number} ({document.id})"


def _tax(document: Document | Invoice) -> Decimal:
    return sum((Decimal(item["amount"]) for item in document.lines if item["kind"] == "tax"), Decimal(0))


def _money(subunits: int, tax: int, unit: str) -> str:
    return f"{show(subunits, unit)} {unit} (net {show(subunits - tax, unit)}, tax {show(tax, unit)})"


def _check_invoice(invoice: Document, posted: Posted, problems: list[str]) -> dict[str, int]:
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


def _check_notes_applied(invoice: Document, posted: Posted, problems: list[str]) -> None:
    """The credit notes' credit an invoice applies after tax (its ``after_tax`` lines) is at most what the account
    applied on it (``CreditNoteCreditApplied``), rounded once; a month's credit note usage invoice bills exactly that
    credit's usage, and applies all of it (``credit_note_usage_commands``): its total is its tax."""
    unit = invoice.currency
    try:
        scale = currency(unit)
    except MoneyError:
        return  # reported by ``_check_arithmetic``
    shown = -sum((Decimal(item["amount"]) for item in invoice.lines if item.get("after_tax")), Decimal(0))
    applied = round_minor(from_subunits(posted.notes_applied.get(unit, 0)), scale)
    if shown > applied:
        problems.append(f"{_name(invoice)} applies {shown} {unit} of credit notes' credit after tax, but the account "
                        f"applied {applied} {unit} of it on the invoice")
    if not is_credit_note_usage(invoice):
        return
    usage = sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] == "usage"), Decimal(0))
    if (usage, shown) != (applied, applied):
        problems.append(f"{_name(invoice)} bills {usage} {unit} of usage paid with credit notes' credit and applies "
                        f"{shown} {unit} of that credit, but the account applied {applied} {unit} of it on the invoice")


def _reversed(amount: int, unit: str) -> str:
    return f" and {show(amount, unit)} {unit} reversed as void" if amount else ""


def _check_credit_note(note: Document, posted: Posted, problems: list[str]) -> None:
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


def _given_back(document: Document, posted: Posted) -> Decimal:
    """What ``document`` gives back of the invoice it names: a gateway refund's note all its lines but the
    ``reclaimed`` ones (credit given before, taken back) and the ``written_off`` one (what the invoice's payment never
    paid, shown by the refund of all it was paid: since session 15), any other document the credit it gives (its
    credit lines and their tax, ``_credit_given``)."""
    if posted.refunded is not None:
        return -sum((Decimal(item["amount"]) for item in document.lines
                     if not item.get("reclaimed") and not item.get("written_off")), Decimal(0))
    net, tax = _credit_given(document)
    return RATING_CONTEXT.add(net, tax)


def _check_given_back(invoice: Document | None, corrected: str, tenant: str,
                      documents: list[tuple[Document, Decimal]], problems: list[str]) -> None:
    """The documents correcting ``invoice`` name a document of the tenant in their currency and, together, never
    give back more than it charged (its total and the credit it netted itself: a change's credit note may bill a new
    plan's rest, which a later cancel credits): it is never below zero."""
    names = ", ".join(f"{_name(d)} {back}" for d, back in documents)
    if invoice is None:
        problems.append(f"{names} correct{'s' if len(documents) == 1 else ''} document {corrected}, which is not "
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

