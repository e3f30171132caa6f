"""Plan options of seed 002 through the ledger (SQLite): minimum spend and price localization."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import Subscription, subscription_id
from billing_rating.catalog_view import CatalogError, validate_document
from eventsourcing.application import AggregateNotFoundError

from tests.unit.subscriptions.test_invoice_overage import run

U = 10**9
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)  # half of November's 30 days left
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2, "list_price": "0.10", "currency": "USD",
                               "list_prices": {"EUR": "0.09", "GBP": "0.08"}}},
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}},
               {"code": "tokens", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "1"}}],
    "plans": [
        {"code": "commit", "name": "Commit", "currency": "USD", "base_fee": "30.00", "minimum_spend": "50.00",
         "charges": [{"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}]},
        {"code": "commit_plus", "name": "Commit plus", "currency": "USD", "base_fee": "60.00",
         "minimum_spend": "100.00"},
        {"code": "commit_year", "name": "Commit year", "currency": "USD", "base_fee": "300.00", "cadence": "year",
         "minimum_spend": "120.00"},
        {"code": "credits", "name": "Credits", "currency": "USD", "base_fee": "30.00", "minimum_spend": "50.00",
         "prices": {"EUR": {"base_fee": "27.00", "minimum_spend": "45.00"}, "GBP": {"base_fee": "24.00",
                                                                                   "minimum_spend": "40.00"}},
         "charges": [{"meter": "tokens", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "1"}}],
         "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]},
        {"code": "credits_max", "name": "Credits max", "currency": "USD", "base_fee": "90.00",
         "prices": {"EUR": "81.00"}, "recurring_credits": [{"unit": "CREDIT", "amount": "500"}]},
    ],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    return ledger



def subscribe(app: LedgerApplication, tenant: str, plan: str, money: str = "USD") -> Subscription:
    run(app, "account.open", tenant, currency=money)
    run(app, "subscription.create", tenant, key="m", plan=plan)
    return app.repository.get(subscription_id(tenant, "m"))  # type: ignore[no-any-return]


def renew_and_bill(app: LedgerApplication, tenant: str, usage: list[str], end: datetime = DEC_1) -> Invoice:
    """The renewal at ``end``, then rating's usage lines of the ended period, which finalize the invoice."""
    run(app, "subscription.tick", tenant, at=end, key="m")
    key = f"{subscription_id(tenant, 'm')}/{end.isoformat()}"
    run(app, "invoice.usage_lines", tenant, at=end, invoice_key=key, period_start=NOV_1.isoformat(),
        period_end=end.isoformat(),
        lines=[{"kind": "usage", "description": "usage", "amount": amount, "meter": "api_calls"} for amount in usage])
    invoice: Invoice = app.repository.get(invoice_id(tenant, key))
    assert invoice.status == "finalized"
    return invoice


def billed(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


# -- minimum spend --------------------------------------------------------------------------------------------

def test_usage_short_of_the_minimum_spend_is_billed_up_to_it_on_the_renewal_invoice(app: LedgerApplication) -> None:
    subscribe(app, "acme", "commit")
    run(app, "usage.debit", "acme", at=datetime(2026, 11, 20, tzinfo=UTC), unit="USD", amount_subunits=20 * U,
        meter="api_calls", overage_policy="overage",
        cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})
    invoice = renew_and_bill(app, "acme", ["20.00"])
    # December's fee, November's 20.00 of usage, and the 30.00 it fell short of the 50.00 committed.
    assert billed(invoice) == [("base_fee", "30.00"), ("usage", "20.00"), ("minimum_commitment", "30.00")]
    assert invoice.total == Decimal("80.00")


def test_usage_paid_from_prepaid_credit_counts_towards_the_minimum_spend(app: LedgerApplication) -> None:
    subscribe(app, "paid", "commit")
    run(app, "credit.grant", "paid", grant_key="usd", unit="USD", amount="100.00")
    run(app, "usage.debit", "paid", at=datetime(2026, 11, 20, tzinfo=UTC), unit="USD", amount_subunits=60 * U,
        meter="api_calls", overage_policy="overage",
        cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})
    invoice = renew_and_bill(app, "paid", ["60.00"])
    assert billed(invoice) == [("base_fee", "30.00"), ("usage", "60.00"), ("credits_applied", "-60.00")]
    assert invoice.total == Decimal("30.00")


def test_credits_used_beyond_the_plans_grant_count_towards_the_minimum_spend_at_their_list_price(
        app: LedgerApplication) -> None:
    subscribe(app, "tokens", "credits")  # 100 CREDIT a month, 50.00 of usage committed
    run(app, "usage.debit", "tokens", at=datetime(2026, 11, 20, tzinfo=UTC), unit="CREDIT", amount_subunits=150 * U,
        meter="tokens", overage_policy="overage", cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})
    invoice = renew_and_bill(app, "tokens", ["0"])  # the 100 granted paid for by the fee: no spend
    assert billed(invoice) == [("base_fee", "30.00"), ("usage", "0.00"), ("overage", "5.00"),
                               ("minimum_commitment", "45.00")]


def test_the_minimum_spend_is_prorated_over_a_mid_period_plan_change(app: LedgerApplication) -> None:
    subscribe(app, "grow", "commit")
    run(app, "subscription.change", "grow", at=NOV_16, key="m", plan="commit_plus")
    invoice = renew_and_bill(app, "grow", [])
    # Half of November at 50.00 committed, half at 100.00: 75.00, nothing used.
    assert billed(invoice) == [("base_fee", "60.00"), ("minimum_commitment", "75.00")]


def test_an_immediate_cancel_bills_the_cut_periods_usage_and_its_prorated_minimum_on_a_final_invoice(
        app: LedgerApplication) -> None:
    sub = subscribe(app, "quit", "commit")  # 50.00 of usage committed a month
    run(app, "usage.debit", "quit", at=datetime(2026, 11, 10, tzinfo=UTC), unit="USD", amount_subunits=8 * U,
        meter="api_calls", overage_policy="overage", cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})
    cancel = run(app, "subscription.cancel", "quit", at=NOV_16, key="m", immediately=True)
    assert [item["amount"] for item in cancel.value["lines"]] == ["-15.00"]  # the credit note, account credit
    # Rating closes November at the cancel and sends its usage lines under the key of a period ending then,
    # once: the same command delivered again (a redelivered Canceled) is a duplicate.
    key = f"{sub.id}/{NOV_16.isoformat()}"
    lines = LedgerCommand(command_id=uuid4(), kind="invoice.usage_lines", tenant="quit", issued_at=NOV_16,
                          issued_by="service:rating", payload={
                              "at": NOV_16.isoformat(), "invoice_key": key, "period_start": NOV_1.isoformat(),
                              "period_end": NOV_16.isoformat(), "lines": [
                                  {"kind": "usage", "description": "usage", "amount": "8.00", "meter": "api_calls"}]})
    assert [r.outcome for r in app.apply_commands([lines])] == ["applied"]
    assert [r.outcome for r in app.apply_commands([lines])] == ["duplicate"]
    final: Invoice = app.repository.get(invoice_id("quit", key))
    # No fee; the 8.00 of overage, and what it falls short of half of November's 50.00 committed.
    assert (final.status, final.number is not None) == ("finalized", True)
    assert billed(final) == [("usage", "8.00"), ("minimum_commitment", "17.00")]
    assert final.total == Decimal("25.00")
    assert app.repository.get(ids.account_id("quit")).unbilled_overage("USD") == {}  # billed, nothing left over


def test_an_immediate_cancel_in_a_trial_commits_no_minimum(app: LedgerApplication) -> None:
    run(app, "catalog.publish", None, digest="c2", document={**CATALOG, "plans": [
        {**CATALOG["plans"][0], "trial_days": 14}, *CATALOG["plans"][1:]]})
    sub = subscribe(app, "try", "commit")
    assert sub.status == "trialing"
    run(app, "subscription.cancel", "try", at=datetime(2026, 11, 5, tzinfo=UTC), key="m", immediately=True)
    key = f"{sub.id}/{datetime(2026, 11, 5, tzinfo=UTC).isoformat()}"
    run(app, "invoice.usage_lines", "try", at=datetime(2026, 11, 5, tzinfo=UTC), invoice_key=key, lines=[],
        period_start=NOV_1.isoformat(), period_end=datetime(2026, 11, 5, tzinfo=UTC).isoformat())
    final: Invoice = app.repository.get(invoice_id("try", key))
    assert (final.status, final.number, final.minimum_spend) == ("void", None, None)  # nothing to bill


def test_a_cadence_change_carries_the_cut_periods_minimum_spend_onto_the_next_renewal_once(
        app: LedgerApplication) -> None:
    subscribe(app, "yearly", "commit")
    run(app, "subscription.change", "yearly", at=NOV_16, key="m", plan="commit_year")  # a new period from Nov 16
    year_end = datetime(2027, 11, 16, tzinfo=UTC)
    invoice = renew_and_bill(app, "yearly", [], end=year_end)
    # Half of November at 50.00 (25.00, its period cut by the change and never billed) + the year's 120.00.
    assert [line for line in billed(invoice) if line[0] == "minimum_commitment"] == [("minimum_commitment", "145.00")]
    # Once: the year after commits the year's 120.00 alone.
    later = renew_and_bill(app, "yearly", [], end=datetime(2028, 11, 16, tzinfo=UTC))
    assert [line for line in billed(later) if line[0] == "minimum_commitment"] == [("minimum_commitment", "120.00")]


def test_a_plan_without_minimum_spend_bills_no_commitment_line(app: LedgerApplication) -> None:
    subscribe(app, "free", "credits_max")
    assert [kind for kind, _ in billed(renew_and_bill(app, "free", []))] == ["base_fee"]


# -- price localization ---------------------------------------------------------------------------------------

def test_an_account_in_a_localized_currency_is_billed_at_the_plans_price_in_it(app: LedgerApplication) -> None:
    sub = subscribe(app, "euro", "credits", "EUR")
    assert (sub.status, sub.plan["currency"], sub.plan["base_fee"]) == ("active", "EUR", "27.00")
    first: Invoice = app.repository.get(invoice_id("euro", f"{sub.id}/{NOV_1.isoformat()}"))
    assert (first.currency, first.total, first.status) == ("EUR", Decimal("27.00"), "finalized")
    assert app.repository.get(ids.account_id("euro")).available("CREDIT") == 100 * U
    run(app, "usage.debit", "euro", at=datetime(2026, 11, 20, tzinfo=UTC), unit="EUR", amount_subunits=5 * U,
        meter="api_calls", overage_policy="overage", cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})
    renewal = renew_and_bill(app, "euro", ["5.00"])  # a EUR-priced meter's usage; the localized minimum: 45.00
    assert renewal.currency == "EUR"
    assert billed(renewal) == [("base_fee", "27.00"), ("usage", "5.00"), ("minimum_commitment", "40.00")]


def test_a_plan_change_in_a_localized_currency_prorates_the_localized_fees(app: LedgerApplication) -> None:
    sub = subscribe(app, "euro", "credits", "EUR")
    result = run(app, "subscription.change", "euro", at=NOV_16, key="m", plan="credits_max")
    # Half of November unused at 27.00, half at 81.00: in EUR, not the plans' USD fees (15.00 and 45.00).
    assert [(x["kind"], x["amount"]) for x in result.value["lines"]] == [("proration", "-13.50"),
                                                                        ("proration", "40.50")]
    change: Invoice = app.repository.get(invoice_id("euro", f"{sub.id}/change/{result.command_id}"))
    assert (change.currency, change.total) == ("EUR", Decimal("27.00"))
    after: Subscription = app.repository.get(sub.id)
    assert (after.plan["code"], after.plan["currency"], after.plan["base_fee"]) == ("credits_max", "EUR", "81.00")
    # credits_max commits no minimum: only the first half of November's 45.00 under Credits is owed.
    assert billed(renew_and_bill(app, "euro", [])) == [("base_fee", "81.00"), ("minimum_commitment", "22.50")]
    # A plan without a price in the subscription's currency cannot be changed to: refused, nothing changes.
    subscribe(app, "pound", "credits", "GBP")
    refused = run(app, "subscription.change", "pound", at=NOV_16, key="m", plan="credits_max", outcome="rejected")
    assert refused.reason == "currency_mismatch"
    assert app.repository.get(subscription_id("pound", "m")).plan["code"] == "credits"


def test_a_plan_without_a_price_in_the_accounts_currency_is_refused_and_nothing_changes(
        app: LedgerApplication) -> None:
    run(app, "account.open", "yen", currency="JPY")
    result = run(app, "subscription.create", "yen", outcome="rejected", key="m", plan="credits")
    assert result.reason == "currency_mismatch"
    assert "USD, EUR, GBP" in result.detail
    with pytest.raises(AggregateNotFoundError):
        app.repository.get(subscription_id("yen", "m"))


def plan_with(**fields: Any) -> dict[str, Any]:
    return {**CATALOG, "plans": [{"code": "p", "name": "P", "currency": "USD", "base_fee": "10.00", **fields}]}


@pytest.mark.parametrize(("fields", "message"), [
    ({"prices": {"EURO": "9.00"}}, "unknown currency 'EURO'"),
    ({"prices": {"eur": "9.00"}}, "unknown currency 'eur'"),
    ({"prices": {"USD": "9.00"}}, "prices.USD repeats the plan's own currency"),
    ({"prices": {"EUR": "-9.00"}}, "negative"),
    ({"minimum_spend": "50.00", "prices": {"EUR": "9.00"}}, "prices.EUR.minimum_spend must be given"),
    ({"prices": {"EUR": {"base_fee": "9.00", "minimum_spend": "45.00"}}}, "prices.EUR.minimum_spend must be given"),
    ({"prices": {"EUR": "9.00"}, "charges": [{"meter": "api_calls", "price": {
        "model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}]}, "charges[0] is priced in USD"),
    ({"prices": {"EUR": "9.00"}, "recurring_credits": [{"unit": "USD", "amount": "5"}]},
     "recurring_credits[0] is in USD"),
])
def test_the_catalogue_refuses_localized_prices_it_could_not_bill(app: LedgerApplication, fields: dict[str, Any],
                                                                   message: str) -> None:
    with pytest.raises(CatalogError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        validate_document(plan_with(**fields))
    result = run(app, "catalog.publish", None, outcome="rejected", document=plan_with(**fields), digest="bad")
    assert result.reason == "invalid_catalog"
    assert app.repository.get(Catalog.create_id()).digest == "c1"


def test_a_plan_published_before_these_options_keeps_its_version(app: LedgerApplication) -> None:
    plain = {**CATALOG, "plans": [{"code": "plain", "name": "Plain", "currency": "USD", "base_fee": "10.00"}]}
    run(app, "catalog.publish", None, document=plain, digest="p1")
    catalog = app.repository.get(Catalog.create_id())
    assert set(catalog.plan("plain", 1)) >= {"code", "base_fee"}
    assert not {"minimum_spend", "prices"} & set(catalog.plan("plain", 1))
    run(app, "catalog.publish", None, document={**plain, "seller": {"name": "other"}}, digest="p2")
    assert app.repository.get(Catalog.create_id()).plan_versions["plain"].keys() == {"1"}
