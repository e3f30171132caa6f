"""Read model: invoices and credit notes with their lines, from the ledger's ``Invoice.*`` events.

* ``invoices``: one row per document (the ``Invoice`` aggregate id): type (invoice | credit_note), status
  (draft -> finalized -> paid | void), gap-free number, issue and due times, billing period, subscription,
  subtotal / tax / total in ledger sub-units of its currency, number of lines, who and when.
* ``invoice_lines``: one row per line, keyed by (invoice, ledger position of the event that added it, index in
  that event): ``Drafted`` brings the first lines, ``LinesAdded`` more (usage lines from rating's close); the
  key orders them as the invoice shows them, and needs no read-back of the lines already stored.

Only ``Invoice.Drafted`` names the tenant; the later events of a document carry its id alone, so they update
the row by id. ``Finalized`` carries the document's total, which is authoritative from then on (the lines'
rounded amounts, summed by the ledger). ``period`` is the month a document was issued (``YYYY-MM``; a draft:
the month it was drafted), for "invoices of November" filters.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from billing_events.money import to_subunits
from billing_projections.facts import Fact, json_text, utc_text
from billing_projections.writer import INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

INVOICES = Table("invoices", {"invoice_id": "TEXT"}, {
    "tenant": value("TEXT NOT NULL"), "invoice_key": value("TEXT NOT NULL"),
    "document_type": value("TEXT NOT NULL"), "currency": value("TEXT NOT NULL"), "status": value("TEXT NOT NULL"),
    "number": value("TEXT"), "period": value("TEXT NOT NULL"), "drafted_at": value("TEXT NOT NULL"),
    "issued_at": value("TEXT"), "due_at": value("TEXT"), "paid_at": value("TEXT"), "voided_at": value("TEXT"),
    "period_start": value("TEXT"), "period_end": value("TEXT"), "subscription_id": value("TEXT"),
    "related_invoice": value("TEXT"), "payment_reference": value("TEXT"), "void_reason": value("TEXT"),
    "subtotal": INT_SUM, "tax": INT_SUM, "total": INT_SUM, "line_count": INT_SUM,
    "drafted_by": value("TEXT"), "finalized_by": value("TEXT"), "updated_at": value("TEXT"),
    "drafted_position": value("BIGINT NOT NULL"), "last_position": value("BIGINT"),
}, indexes=("tenant, drafted_position", "period, tenant", "status, drafted_position"))
INVOICE_LINES = Table("invoice_lines", {"invoice_id": "TEXT", "position": "BIGINT", "line_index": "INTEGER"}, {
    "kind": value("TEXT NOT NULL"), "description": value("TEXT"), "quantity": value("TEXT"),
    "unit_amount": value("TEXT"), "amount": value("BIGINT NOT NULL"), "exact_amount": value("TEXT"),
    "meter": value("TEXT"), "detail": value("TEXT"),
}, append_only=True)
TABLES = (INVOICES, INVOICE_LINES)

STATUSES = ("draft", "finalized", "paid", "void")
DOCUMENT_TYPES = ("invoice", "credit_note")
TAX_KIND = "tax"
_LINE_FIELDS = frozenset({"kind", "description", "quantity", "unit_amount", "amount", "exact_amount", "meter"})


def handler_for(event_type: str) -> Handler | None:
    aggregate, _, name = event_type.partition(".")
    if aggregate != "Invoice":
        return None
    return _HANDLERS.get(name)


def _subunits(amount: Any) -> int:
    """A line's amount (decimal text in the currency, rounded once by the ledger) in ledger sub-units."""
    try:
        return to_subunits(Decimal(str(amount)))
    except InvalidOperation:
        return 0


def _time(value: Any) -> str | None:
    return utc_text(value) if isinstance(value, str) and value else None


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _add_lines(fact: Fact, w: BatchWriter, lines: Sequence[Any]) -> dict[str, int]:
    """Appends the event's lines; returns what they add to the document's sums."""
    sums = {"subtotal": 0, "tax": 0, "total": 0, "line_count": 0}
    for index, item in enumerate(lines):
        if not isinstance(item, dict):
            continue
        amount = _subunits(item.get("amount", "0"))
        kind = str(item.get("kind") or "")
        extra = {k: v for k, v in item.items() if k not in _LINE_FIELDS}
        w.append(INVOICE_LINES, (
            fact.aggregate_id, fact.position, index, kind, _text(item.get("description")), _text(item.get("quantity")),
            _text(item.get("unit_amount")), amount, _text(item.get("exact_amount")), _text(item.get("meter")),
            json_text(extra) if extra else None))
        sums["tax" if kind == TAX_KIND else "subtotal"] += amount
        sums["total"] += amount
        sums["line_count"] += 1
    return sums


def _drafted(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    tenant = data.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        return
    drafted_at = _time(data.get("at")) or fact.recorded_at
    w.insert(INVOICES, (fact.aggregate_id,), {
        "tenant": tenant, "invoice_key": str(data.get("key") or ""),
        "document_type": str(data.get("document_type") or "invoice"), "currency": str(data.get("currency") or ""),
        "status": "draft", "period": drafted_at[:7], "drafted_at": drafted_at,
        "period_start": _time(data.get("period_start")), "period_end": _time(data.get("period_end")),
        "subscription_id": _text(data.get("subscription_id")), "related_invoice": _text(data.get("related_invoice")),
        "drafted_by": _text(data.get("by")), "drafted_position": fact.position,
    })
    w.upsert(INVOICES, (fact.aggregate_id,), add=_add_lines(fact, w, data.get("lines") or []),
             set={"updated_at": fact.recorded_at, "last_position": fact.position})


def _lines_added(fact: Fact, w: BatchWriter) -> None:
    w.upsert(INVOICES, (fact.aggregate_id,), add=_add_lines(fact, w, fact.data.get("lines") or []),
             set={"updated_at": fact.recorded_at, "last_position": fact.position})


def _finalized(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    issued_at = _time(data.get("issued_at")) or fact.recorded_at
    changes: dict[str, Any] = {
        "status": "finalized", "number": _text(data.get("number")), "issued_at": issued_at,
        "due_at": _time(data.get("due_at")), "period": issued_at[:7], "finalized_by": _text(data.get("by")),
        "updated_at": fact.recorded_at, "last_position": fact.position}
    if data.get("total") is not None:
        changes["total"] = _subunits(data["total"])
    w.upsert(INVOICES, (fact.aggregate_id,), set=changes)


def _paid(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    w.upsert(INVOICES, (fact.aggregate_id,), set={
        "status": "paid", "paid_at": _time(data.get("at")) or fact.recorded_at,
        "payment_reference": _text(data.get("payment")), "updated_at": fact.recorded_at,
        "last_position": fact.position})


def _voided(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    w.upsert(INVOICES, (fact.aggregate_id,), set={
        "status": "void", "voided_at": _time(data.get("at")) or fact.recorded_at,
        "void_reason": _text(data.get("reason")), "updated_at": fact.recorded_at, "last_position": fact.position})


_HANDLERS: dict[str, Handler] = {"Drafted": _drafted, "LinesAdded": _lines_added, "Finalized": _finalized,
                                 "Paid": _paid, "Voided": _voided}


def project(fact: Fact, w: BatchWriter) -> None:
    handler = handler_for(fact.type)
    if handler is not None:
        handler(fact, w)


# -- queries ---------------------------------------------------------------------------------------------

COLUMNS = ("invoice_id", "tenant", "invoice_key", "document_type", "currency", "status", "number", "period",
           "drafted_at", "issued_at", "due_at", "paid_at", "voided_at", "period_start", "period_end",
           "subscription_id", "related_invoice", "payment_reference", "void_reason", "subtotal", "tax", "total",
           "line_count", "drafted_position", "last_position")
LINE_COLUMNS = ("position", "line_index", "kind", "description", "quantity", "unit_amount", "amount",
                "exact_amount", "meter", "detail")


async def page(db: Database, *, tenant: str | None, statuses: Sequence[str] = (), types: Sequence[str] = (),
               period: str | None = None, year_prefix: str | None = None, subscription: str | None = None,
               before_position: int | None = None, limit: int) -> list[dict[str, Any]]:
    """Newest first (the order they were drafted in); keyset on ``drafted_position``."""
    where: list[str] = []
    args: list[Any] = []

    def add(sql: str, arg: Any) -> None:
        args.append(arg)
        where.append(sql.replace("?", f"${len(args)}"))

    def one_of(column: str, wanted: Sequence[str]) -> None:
        placeholders = []
        for item in wanted:
            args.append(item)
            placeholders.append(f"${len(args)}")
        where.append(f"{column} IN ({', '.join(placeholders)})")

    if tenant is not None:
        add("tenant = ?", tenant)
    if statuses:
        one_of("status", statuses)
    if types:
        one_of("document_type", types)
    if period:
        add("period = ?", period)
    if year_prefix:
        add("period LIKE ?", year_prefix + "%")
    if subscription:
        add("subscription_id = ?", subscription)
    if before_position is not None:
        add("drafted_position < ?", before_position)
    args.append(limit)
    return await db.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM invoices {'WHERE ' + ' AND '.join(where) if where else ''} "
        f"ORDER BY drafted_position DESC LIMIT ${len(args)}", *args)


async def one(db: Database, tenant: str, invoice_id: str) -> dict[str, Any] | None:
    return await db.fetchrow(f"SELECT {', '.join(COLUMNS)} FROM invoices WHERE invoice_id = $1 AND tenant = $2",
                             invoice_id, tenant)


async def lines(db: Database, invoice_id: str) -> list[dict[str, Any]]:
    return await db.fetch(f"SELECT {', '.join(LINE_COLUMNS)} FROM invoice_lines WHERE invoice_id = $1 "
                          "ORDER BY position, line_index", invoice_id)
