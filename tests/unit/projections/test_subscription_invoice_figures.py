"""The dashboard's figures, history and chart of accounts count subscription invoices: their fees and tax are
receivable when finalized, and money taken in (funds in, tax collected) when paid; a credit note is credit
given back. Fed the ledger's real events (its own commands)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from billing_events import ids
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import subscription_id
from billing_projections import balances, figures, history
from billing_projections.service import ProjectionService
from billing_projections.views import load_units, transaction_view

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import T0, Ledger, U

CENT = U // 100
CATALOG = {
    "credit_units": {"CREDIT": {"scale": 0}},
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "billing", "country": "DE"},
}
PAID_AT = T0 + timedelta(days=3)  # T0 is 2026-10-30: paid in November


def subscribed(ledger: Ledger) -> str:
    """acme subscribes to Team x3 (90.00 + 17.10 VAT), pays that invoice in November and downgrades to x1."""
    ledger.command("catalog.publish", None, document=CATALOG, digest="team-1")
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("tax_profile.set", "acme", country="DE")
    ledger.command("subscription.create", "acme", key="m", plan="team", quantity=3)
    sub = ledger.get(subscription_id("acme", "m"))
    invoice = ledger.get(invoice_id("acme", f"{sub.id}/{sub.period_start.isoformat()}"))
    assert invoice.total == Decimal("107.10")
    ledger.command("invoice.mark_paid", "acme", at=PAID_AT, invoice_id=str(invoice.id), payment="pi_1")
    return str(invoice.id)


async def test_figures_count_a_paid_subscription_invoice_as_funds_in_and_tax_collected(
        service: ProjectionService) -> None:
    ledger = Ledger()
    subscribed(ledger)
    await apply(service, ledger.records())
    rows = {(r["bucket"], r["unit"]): r for r in await figures.series(service.db, tenant="acme", granularity="month",
                                                                     since=None, until=None)}
    october, november = rows[("2026-10", "USD")], rows[("2026-11", "USD")]
    assert october["receivables"] == 10710 * CENT  # billed when finalized
    assert (october["funds_in"], october["tax_collected"]) == (0, 0)
    assert (november["funds_in"], november["tax_collected"], november["settlements"]) == (
        10710 * CENT, 1710 * CENT, 10710 * CENT)
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    assert chart[("gateway_clearing", "USD")] == 10710 * CENT
    assert chart[("tax_payable", "USD")] == -1710 * CENT
    assert chart[("deferred_revenue", "USD")] == -9000 * CENT  # billed in advance for the period
    assert chart.get(("recognised_revenue", "USD"), 0) == 0
    assert chart.get(("receivables", "USD"), 0) == 0


async def test_the_chart_of_accounts_shows_fee_revenue_recognised_over_the_period_as_the_ledger_books_it(
        service: ProjectionService) -> None:
    ledger = Ledger()
    subscribed(ledger)
    sub = ledger.get(subscription_id("acme", "m"))
    middle = sub.period_start + (sub.period_end - sub.period_start) / 2
    ledger.command("money.recognise", "acme", at=middle, now=middle.isoformat())
    await apply(service, ledger.records())
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    # Half the period: half the 90.00 fee recognised, half still deferred; the same as the ledger's own postings.
    assert (chart[("recognised_revenue", "USD")], chart[("deferred_revenue", "USD")]) == (-4500 * CENT, -4500 * CENT)
    postings = [p for e in ledger.app.events.get(ids.account_id("acme")) for p in getattr(e, "postings", None) or []]
    assert {k: v for k, v in chart.items() if v} == {k: v for k, v in account_balances(postings).items() if v}


async def test_history_shows_a_subscription_invoice_billed_and_paid_and_a_credit_note(
        service: ProjectionService) -> None:
    ledger = Ledger()
    invoice = subscribed(ledger)
    ledger.command("subscription.change", "acme", at=PAID_AT + timedelta(days=1), key="m", quantity=1)
    await apply(service, ledger.records())
    rows = list(reversed(await history.page(service.db, tenant="acme", limit=1000)))
    money = [(r["type"], int(r["amount"]), int(r["wallet_delta"]), r["reference"]) for r in rows
             if r["unit"] == "USD"]
    assert money[:2] == [("invoice_billed", -10710 * CENT, 0, invoice), ("invoice_paid", 10710 * CENT, 0, invoice)]
    [grant] = [r for r in rows if r["type"] == "grant"]
    assert (grant["detail"], int(grant["wallet_delta"]) > 0) == ("credit_note", True)
    # The wallet rows still sum to the balance the ledger keeps.
    account = ledger.get(ids.account_id("acme"))
    assert sum(int(r["wallet_delta"]) for r in rows if r["unit"] == "USD") == account.balance("USD")
    nov = {(r["bucket"], r["unit"]): r for r in await figures.series(service.db, tenant="acme", granularity="month",
                                                                    since=None, until=None)}[("2026-11", "USD")]
    assert nov["refunds"] == int(grant["amount"]) and nov["tax_refunded"] > 0


async def test_an_invoice_payment_row_names_its_payment_and_the_api_shows_its_split_in_the_currency(
        service: ProjectionService) -> None:
    ledger = Ledger()
    subscribed(ledger)
    await apply(service, ledger.records())
    rows = list(reversed(await history.page(service.db, tenant="acme", limit=1000)))
    [paid] = [r for r in rows if r["type"] == "invoice_paid"]
    assert paid["payment_id"] == "pi_1"  # the dashboard's cause: which payment settled it
    view = transaction_view(paid, await load_units(service.db))
    assert view["detail"] == "net 90.00, tax 17.10"  # not ledger sub-units
