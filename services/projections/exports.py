"""CSV exports (RFC 4180) of any list the API returns: the same rows, flattened, every page streamed.

An export has no row cap: it reads its list a page (``CSV_PAGE_ITEMS``) at a time through the list's keyset cursor
and writes each page before reading the next, so it holds one page whatever its length (the ASGI server waits for
a slow client before the next page is read). The first page is read before the response starts: the list functions
check their filters when they read (an unknown ``type`` or ``status``, a bad ``period``), so bad input is the same
422 problem+json as the JSON form's, never a ``200 text/csv`` whose stream breaks. A failure after that (the
database) propagates from the body: the server aborts the connection without the chunked body's last chunk, so a
client never takes a cut file for a complete one.

Spreadsheet formulas (CSV injection, OWASP): the cells carry text a tenant chose (usage properties such as ``user``,
``model``; reasons, names), and a spreadsheet opens a cell beginning with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return as a formula. Such a text cell is written with a single quote before it (``'=HYPERLINK(...)``),
which the spreadsheet shows as text. Which cells are text is decided by the column (``NUMBER_COLUMNS``): a number
column's plain decimal number (an amount of ``-5.00``, a quantity) is written as it is, so it stays a number; any
other value in it, and every cell of the other columns, is text.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from billing_projections.limits import CSV_PAGE_ITEMS
from fastapi.responses import StreamingResponse

Page = tuple[list[dict[str, Any]], str | None]
# Fetches one page: (cursor, page size) -> (items, next cursor or None).
PageFetcher = Callable[[str | None, int], Awaitable[Page]]


# The columns whose cells are numbers (amounts, quantities, counts, ratios) in the exports' lists: their plain
# decimal numbers are not escaped. A column left out is text: its negative numbers would read '-5.00, never a formula.
NUMBER_COLUMNS = frozenset({
    "accounts_churned", "accounts_end", "accounts_new", "accounts_start", "adjustments", "amount", "arr", "available",
    "balance", "base_fee", "carry_drawn", "breakage", "breakage_revenue", "cached_tokens", "chargeback_tax", "chargebacks",
    "closing_deferred", "consumed", "cost", "credit_note_tax", "credit_notes", "credit_sold", "dispute_fees",
    "disputed", "events", "exact_amount", "expiring_soon", "fees_billed", "funds_in", "held", "held_delta",
    "input_tokens", "late_usage_reserve", "line_index", "logo_churn_rate", "low_balance_threshold", "meters", "month",
    "monthly_fees", "mrr", "mrr_churned", "mrr_contraction", "mrr_end", "mrr_expansion", "mrr_new", "mrr_start",
    "net_revenue_retention", "opening_deferred", "other", "output_tokens", "overage_repaid", "plan_grants", "plan_version",
    "position", "priority", "promotional", "promotional_expense", "quantity", "quarterly_fees", "receivable",
    "receivables", "recognised_fees", "recognised_revenue", "recognised_usage", "refunded", "refunds", "remaining",
    "revenue_churn_rate", "revenue_fees", "revenue_other", "revenue_refunded", "revenue_usage", "settlements",
    "share_percent", "subscriptions", "subtotal", "tax", "tax_collected", "tax_refunded", "tokens", "top_ups", "total",
    "unit_amount", "wallet_delta", "year", "yearly_fees"})
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
# What a spreadsheet reads as the start of a formula (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _safe_cell(column: str, value: Any) -> str:
    """``value`` as the cell of ``column``: a text cell that a spreadsheet would open as a formula gets a single quote
    before it; a number column's plain decimal number stays as it is."""
    text = _cell(value)
    if column in NUMBER_COLUMNS and _NUMBER.fullmatch(text):
        return text
    return "'" + text if text.startswith(_FORMULA_START) else text


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":")) if value else ""
    return str(value)


def _line(values: Sequence[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(values)
    return buffer.getvalue()


def _header(columns: Sequence[str]) -> str:
    return _line([_safe_cell("", c) for c in columns])


def _row(columns: Sequence[str], item: dict[str, Any]) -> str:
    return _line([_safe_cell(c, item.get(c)) for c in columns])


async def csv_response(columns: Sequence[str], fetch: PageFetcher, filename: str) -> StreamingResponse:
    """Every page of ``fetch`` as CSV; its first page read now, so that bad input raises before any byte is sent."""
    return _streamed(columns, await fetch(None, CSV_PAGE_ITEMS), fetch, filename)


def csv_of(columns: Sequence[str], items: list[dict[str, Any]], filename: str) -> StreamingResponse:
    """A list already read whole (the lists without pages) as CSV."""
    return _streamed(columns, (items, None), None, filename)


def csv_text(columns: Sequence[str], items: list[dict[str, Any]]) -> str:
    """A list as the CSV text :func:`csv_of` sends (the same header, cells and line ends), for the command line."""
    return _header(columns) + "".join(_row(columns, item) for item in items)


def _streamed(columns: Sequence[str], first: Page, fetch: PageFetcher | None, filename: str) -> StreamingResponse:
    async def body(items: list[dict[str, Any]], cursor: str | None) -> AsyncIterator[str]:
        yield _header(columns)
        while True:
            for item in items:
                yield _row(columns, item)
            if fetch is None or cursor is None or not items:
                return
            items = []  # the page written is let go before the next is read: one page held, not two
            items, cursor = await fetch(cursor, CSV_PAGE_ITEMS)

    return StreamingResponse(body(*first), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'})
