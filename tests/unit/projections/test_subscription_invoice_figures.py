"""The dashboard's figures, history and chart of accounts count subscription invoices: their fees and tax are
receivable when finalized, and money taken in (funds in, tax collected) when paid; a credit note is account
credit given (``credit_notes``), a gateway refund of a paid invoice money paid back (``refunds``). Fed the ledger's
real events (its own commands)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.limits import RECURRING_CREDIT_LATE_USAGE_DAYS
from billing_ledger.payment_commands import payment_command
from billing_projections import balances, figures, history
from billing_projections.facts import utc_text
from billing_projections.service import ProjectionService
from billing_projections.views import load_units, transaction_view

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import T0, Ledger, U, uid

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
    # Half the period (Oct 30 12:00 - Nov 15 00:00): half the 90.00 fee recognised, a UTC day's share at a time,
    # each rounded down (at most a sub-unit a day below), the rest still deferred; the same as the ledger's postings.
    recognised, deferred = -chart[("recognised_revenue", "USD")], -chart[("deferred_revenue", "USD")]
    assert 4500 * CENT - 16 <= recognised <= 4500 * CENT and recognised + deferred == 9000 * CENT
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
    assert (nov["refunds"], nov["tax_refunded"]) == (0, 0)  # account credit, no money paid back
    assert nov["credit_notes"] == int(grant["amount"]) and nov["credit_note_tax"] > 0


def gateway_refund(ledger: Ledger, invoice: str, amount: str, reference: str) -> None:
    """The gateway paid back ``amount`` of the invoice's payment (pi_1), a verified webhook on Nov 4."""
    refund = PaymentNotification(gateway="stripe", gateway_event_id=f"evt_{reference}", kind="refund_succeeded",
                                 tenant="acme", order_id=invoice, invoice_id=invoice, amount=Decimal(amount),
                                 currency="USD", verified_at=PAID_AT + timedelta(days=2), gateway_reference=reference,
                                 refunded_payment="pi_1")
    [result] = ledger.app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result


async def november(service: ProjectionService) -> dict[str, Any]:
    return {(r["bucket"], r["unit"]): r for r in await figures.series(
        service.db, tenant="acme", granularity="month", since=None, until=None)}[("2026-11", "USD")]


async def test_a_downgrade_credit_note_counts_as_credit_notes_and_a_gateway_refund_as_refunds(
        service: ProjectionService) -> None:
    """Team x3 paid (107.10), downgraded to x1 on Nov 3: 27 of the period's 31 days of two seats come back as
    account credit, 52.26 + 9.93 VAT, no money paid out. Then the gateway pays back 11.90 (10.00 + 1.90 VAT)."""
    ledger = Ledger()
    invoice = subscribed(ledger)
    ledger.command("subscription.change", "acme", at=PAID_AT + timedelta(days=1), key="m", quantity=1)
    await apply(service, ledger.records())
    nov = await november(service)
    assert (nov["refunds"], nov["tax_refunded"]) == (0, 0)  # was 62.19 / 9.93: nothing left the gateway
    assert (nov["credit_notes"], nov["credit_note_tax"]) == (6219 * CENT, 993 * CENT)

    gateway_refund(ledger, invoice, "11.90", "re_1")
    await apply(service, ledger.records())
    nov = await november(service)
    assert (nov["refunds"], nov["tax_refunded"]) == (1190 * CENT, 190 * CENT)  # was 74.09 / 11.83
    assert (nov["credit_notes"], nov["credit_note_tax"]) == (6219 * CENT, 993 * CENT)
    # ``refunds`` is the money that left the gateway's clearing: what came in less it is what is still there.
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    assert chart[("gateway_clearing", "USD")] == nov["funds_in"] - nov["refunds"] == (10710 - 1190) * CENT


async def test_a_full_refund_after_a_downgrade_counts_the_money_paid_back_and_the_credit_note_as_issued(
        service: ProjectionService) -> None:
    """The whole 107.10 paid back after the downgrade's 62.19 credit note: the gateway paid 107.10 (the note's
    unspent credit is taken back from the wallet); the note issued 62.19 of credit all the same."""
    ledger = Ledger()
    invoice = subscribed(ledger)
    ledger.command("subscription.change", "acme", at=PAID_AT + timedelta(days=1), key="m", quantity=1)
    gateway_refund(ledger, invoice, "107.10", "re_all")
    await apply(service, ledger.records())
    nov = await november(service)
    assert nov["refunds"] == 10710 * CENT and nov["credit_notes"] == 6219 * CENT
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    assert chart.get(("gateway_clearing", "USD"), 0) == nov["funds_in"] - nov["refunds"] == 0


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


async def test_what_a_full_refund_leaves_owed_counts_as_receivables_as_the_ledger_books_it(
        service: ProjectionService) -> None:
    """The downgrade's 62.19 of credit, 20.00 of it spent on usage, then the whole 107.10 paid back: the 20.00 the
    credit no longer covers (and the seat kept since the downgrade) is owed; the figures say so, as the ledger."""
    ledger = Ledger()
    invoice = subscribed(ledger)
    changed = PAID_AT + timedelta(days=1)
    ledger.command("subscription.change", "acme", at=changed, key="m", quantity=1)
    sub = ledger.get(subscription_id("acme", "m"))
    ledger.command("usage.debit", "acme", at=changed + timedelta(hours=1), unit="USD", amount_subunits=20 * U,
                   meter="api_calls", overage_policy="overage",
                   cause={"event_ids": ["e1"], "period": sub.period_start.isoformat()})
    gateway_refund(ledger, invoice, "107.10", "re_all")
    owed = ledger.get(ids.account_id("acme")).receivable("USD")
    assert owed > 20 * U
    await apply(service, ledger.records())
    nov = await november(service)
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    rows = await figures.series(service.db, tenant="acme", granularity="month", since=None, until=None)
    booked = sum(r["receivables"] - r["settlements"] for r in rows if r["unit"] == "USD")
    assert chart[("receivables", "USD")] == booked == owed  # was 0 booked: 107.10 billed, 107.10 settled
    assert nov["refunds"] == 10710 * CENT



async def test_overage_a_periods_minimum_commitment_already_billed_is_no_longer_receivable(
        service: ProjectionService) -> None:
    ledger = Ledger()
    account = ledger.open("acme")
    # October was billed 15.00 of usage against a 20.00 minimum (a 5.00 commitment); a late correction raised it by
    # 10.00, of which the next invoice bills 5.00: the other 5.00 is netted, owed once.
    account.commit_period_minimum(invoice="inv-oct", unit="USD", period="2026-10", minimum=20 * U, spend=15 * U, at=T0)
    account.debit_usage(command_id=uid("usage", 1), unit="USD", amount=10 * U, meter="api_calls", at=T0,
                        overage_policy="overage", cause={"period": "2026-10"})
    taken = account.invoice_overage(invoice="inv-nov", units=["USD"], end=T0, at=T0)
    assert account.charge_period_minimums(invoice="inv-nov", unit="USD", taken=taken["USD"], minor=CENT,
                                          at=T0) == {"2026-10": 5 * U}
    ledger.save(account)
    await apply(service, ledger.records())
    rows = {(r["bucket"], r["unit"]): r for r in await figures.series(service.db, tenant="acme", granularity="month",
                                                                     since=None, until=None)}
    assert rows[("2026-10", "USD")]["receivables"] == account.receivable("USD") == 5 * U


async def test_the_rounding_of_an_invoices_usage_lines_is_receivable_as_the_ledger_books_it(
        service: ProjectionService) -> None:
    ledger = Ledger()
    account = ledger.open("acme")
    # 0.015 used beyond credit, billed on three lines of 0.01: 0.015 more is receivable; a second invoice rounded
    # down 0.004 and was voided, so its rounding is owed again.
    account.debit_usage(command_id=uid("usage", 1), unit="USD", amount=15 * U // 1000, meter="api_calls", at=T0,
                        overage_policy="overage", cause={"period": "2026-10"})
    account.invoice_overage(invoice="inv-1", units=["USD"], end=T0, at=T0)
    account.round_invoiced_overage(invoice="inv-1", unit="USD", billed=3 * CENT, bound=5 * CENT // 2, at=T0)
    account.debit_usage(command_id=uid("usage", 2), unit="USD", amount=4 * U // 1000, meter="api_calls", at=T0,
                        overage_policy="overage", cause={"period": "2026-10"})
    account.invoice_overage(invoice="inv-2", units=["USD"], end=T0, at=T0)
    account.round_invoiced_overage(invoice="inv-2", unit="USD", billed=0, bound=CENT, at=T0)
    account.return_invoiced_overage(invoice="inv-2", at=T0)
    ledger.save(account)
    await apply(service, ledger.records())
    rows = await figures.series(service.db, tenant="acme", granularity="month", since=None, until=None)
    chart = {(r["ledger_account"], r["unit"]): int(r["amount"])
             for r in await balances.ledger_balances(service.db, "acme")}
    booked = sum(r["receivables"] - r["settlements"] for r in rows if r["unit"] == "USD")
    assert chart[("receivables", "USD")] == booked == account.receivable("USD") == 3 * CENT + 4 * U // 1000


async def test_a_plan_credit_lapsed_above_its_rollover_cap_is_breakage_in_the_figures_and_on_its_grant(
        service: ProjectionService) -> None:
    ledger = Ledger()
    ledger.command("catalog.publish", None, digest="rollover-1", document={
        "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00",
                   "recurring_credits": [{"unit": "USD", "amount": "10.00", "rollover": True,
                                          "rollover_cap": "2.00"}]}]})
    ledger.command("account.open", "acme", currency="USD")
    ledger.command("subscription.create", "acme", key="m", plan="team")
    sub = ledger.get(subscription_id("acme", "m"))
    start, end = sub.period_start, sub.period_end
    ledger.command("usage.debit", "acme", at=start + timedelta(days=3), unit="USD", amount_subunits=400 * CENT,
                   meter="api_calls", overage_policy="overage", cause={"event_ids": ["e1"], "period": start.isoformat()})
    ledger.command("subscription.tick", "acme", at=end, key="m")  # 6.00 left: 2.00 carried, 4.00 kept
    await apply(service, ledger.records())
    # Since session 14 the 4.00 above the cap stays for the period's late usage, set aside, and lapses after it.
    november, december = await balances.grants(service.db, "acme")
    lapses = end + timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
    assert (november["status"], november["remaining"], november["expires_at"], december["remaining"]) == (
        "open", 400 * CENT, utc_text(lapses), 1200 * CENT)
    assert november["set_aside_at"] is not None
    assert await balances.late_usage_reserves(service.db, "acme") == {("acme", "USD"): 400 * CENT}
    # The carry leaves November's grant as a void row naming it: the wallet's rows still sum to its balance.
    rows = list(reversed(await history.page(service.db, tenant="acme", limit=100)))
    assert [(r["grant_id"], r["wallet_delta"]) for r in rows if r["type"] == "void"] == [
        (november["grant_id"], -200 * CENT)]
    [wallet] = await balances.wallets(service.db, "acme")
    assert sum(r["wallet_delta"] for r in rows) == wallet["balance"] == 1600 * CENT
    ledger.command("grant.expire", "acme", at=lapses, now=lapses.isoformat())
    await apply(service, ledger.records())
    rows = await figures.series(service.db, tenant="acme", granularity="month", since=None, until=None)
    assert sum(r["breakage"] for r in rows) == 400 * CENT  # was 0: the void's lapsed part was not counted
    [expired] = await balances.grants(service.db, "acme", status="expired")
    assert (expired["remaining"], expired["breakage"]) == (0, 400 * CENT)
