"""What a renewal invoice bills for the ended period's usage, and what paying it settles (SQLite ledger)."""

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
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.postings import LedgerAccount
from billing_ledger.domain.subscription import subscription_id

U = 10**9
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2, "list_price": "0.10", "currency": "USD"}},
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}},
               {"code": "tokens", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "1"}}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00",
               "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]}],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    run(ledger, "account.open", "acme", currency="USD")
    assert run(ledger, "subscription.create", "acme", key="m", plan="team").outcome == "applied"
    return ledger


def run(app: LedgerApplication, kind: str, tenant: str | None, at: datetime = NOV_1, outcome: str = "applied",
        **payload: Any) -> Any:
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=at, issued_by="user:test",
                            payload={"at": at.isoformat(), **payload})
    [result] = app.apply_commands([command])
    assert result.outcome == outcome, result
    return result


def debit(app: LedgerApplication, amount: str, period: datetime, at: datetime, unit: str = "USD",
          meter: str = "api_calls") -> None:
    """A usage debit as rating sends it: priced in ``period`` (the subscription period's start)."""
    run(app, "usage.debit", "acme", at=at, unit=unit, amount_subunits=int(Decimal(amount) * U), meter=meter,
        overage_policy="overage", cause={"event_ids": [str(uuid4())], "period": period.isoformat()})


def renew_and_bill(app: LedgerApplication, ended: datetime, end: datetime,
                   lines: list[dict[str, str]], usage_before_lines: Any = None) -> Invoice:
    """The renewal at ``end``, then (after ``usage_before_lines``, if any) rating's usage lines of the period."""
    run(app, "subscription.tick", "acme", at=end, key="m")
    if usage_before_lines is not None:
        usage_before_lines()
    key = f"{subscription_id('acme', 'm')}/{end.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=end, invoice_key=key, lines=lines, period_start=ended.isoformat(),
        period_end=end.isoformat())
    invoice: Invoice = app.repository.get(invoice_id("acme", key))
    assert invoice.status == "finalized"
    return invoice


def usage_line(amount: str, meter: str = "api_calls") -> dict[str, str]:
    return {"kind": "usage", "description": f"{meter}", "amount": amount, "meter": meter}


def account(app: LedgerApplication) -> BillingAccount:
    return app.repository.get(ids.account_id("acme"))  # type: ignore[no-any-return]


def test_the_invoice_bills_the_ended_periods_overage_even_when_the_next_periods_usage_arrives_first(
        app: LedgerApplication) -> None:
    run(app, "credit.grant", "acme", grant_key="usd", unit="USD", amount="2.00")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # 2.00 from credit, 3.00 overage
    # December's first usage is debited before rating's lines for November reach the ledger (no order between
    # the two topics): it is December's overage and must wait for December's invoice.
    november = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")],
                              lambda: debit(app, "4.00", DEC_1, datetime(2026, 12, 1, 0, 5, tzinfo=UTC)))
    assert november.total == Decimal("33.00")  # December's fee + November's 3.00 of overage
    assert [(x["kind"], x["amount"]) for x in november.lines[1:]] == [("usage", "5.00"), ("credits_applied", "-2.00")]
    december = renew_and_bill(app, DEC_1, JAN_1, [usage_line("4.00")])
    assert december.total == Decimal("34.00")  # January's fee + December's 4.00, no credit applied
    assert account(app).unbilled_overage("USD") == {}


def test_overage_left_from_an_earlier_period_is_billed_on_its_own_line(app: LedgerApplication) -> None:
    # Usage posted for October (before the subscription) was never invoiced: the first renewal bills it too.
    debit(app, "1.50", datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 10, 31, tzinfo=UTC))
    debit(app, "2.00", NOV_1, datetime(2026, 11, 2, tzinfo=UTC))
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("2.00")])
    assert [(x["kind"], x["amount"]) for x in invoice.lines[1:]] == [
        ("usage", "2.00"), ("overage", "1.50")]
    assert invoice.total == Decimal("33.50")


def test_a_credit_priced_meter_that_ran_out_is_billed_at_the_credit_list_price(app: LedgerApplication) -> None:
    debit(app, "150", NOV_1, datetime(2026, 11, 20, tzinfo=UTC), unit="CREDIT", meter="tokens")  # 100 granted
    assert account(app).receivable("CREDIT") == 50 * U
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    [overage] = [x for x in invoice.lines if x["kind"] == "overage"]
    assert (overage["quantity"], overage["unit_amount"], overage["amount"]) == ("50", "0.10", "5.00")
    assert invoice.total == Decimal("35.00")  # fee + 50 CREDIT at 0.10 USD


def test_paying_the_invoice_settles_the_overage_it_billed(app: LedgerApplication) -> None:
    debit(app, "3.25", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    debit(app, "120", NOV_1, datetime(2026, 11, 21, tzinfo=UTC), unit="CREDIT", meter="tokens")
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("3.25"), usage_line("0", meter="tokens")])
    debit(app, "1.00", DEC_1, datetime(2026, 12, 2, tzinfo=UTC))  # December's: not on this invoice
    assert (account(app).overage_receivable("USD"), account(app).receivable("CREDIT")) == (425 * U // 100, 20 * U)
    run(app, "invoice.mark_paid", "acme", at=datetime(2026, 12, 3, tzinfo=UTC), invoice_id=str(invoice.id),
        payment="pi_1")
    after = account(app)
    assert (after.overage_receivable("USD"), after.receivable("CREDIT")) == (1 * U, 0)  # only December's overage
    assert after.invoiced_overage(str(invoice.id)) == {}
    settled = [e for e in app.events.get(after.id) if type(e).__name__ == "ReceivableSettled"]
    assert sorted((e.unit, e.amount) for e in settled) == [("CREDIT", 20 * U), ("USD", 325 * U // 100)]
    for event in settled:  # Dr gateway clearing / Cr receivables, balanced
        assert {(p["account"], p["amount"]) for p in event.postings} == {
            (LedgerAccount.GATEWAY_CLEARING.value, event.amount), (LedgerAccount.RECEIVABLES.value, -event.amount)}
    # Paid twice (dunning's mark_paid and the gateway's webhook): nothing more settled.
    again = run(app, "invoice.mark_paid", "acme", at=datetime(2026, 12, 4, tzinfo=UTC), invoice_id=str(invoice.id),
                payment="pi_1")
    assert again.value["already_paid"] is True
    assert account(app).overage_receivable("USD") == 1 * U


def test_usage_covered_by_credit_applies_the_credit_drawn_and_bills_only_the_rounding_of_its_lines(
        app: LedgerApplication) -> None:
    run(app, "credit.grant", "acme", grant_key="usd", unit="USD", amount="1.00")
    debit(app, "0.005", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    debit(app, "0.005", NOV_1, datetime(2026, 11, 21, tzinfo=UTC))
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0.005"), usage_line("0.005", meter="other")])
    # 0.01 of credit was drawn, not 0.02: each line is rounded once (0.01 + 0.01) and their rounding is billed,
    # posted to receivables with it (docs/money.md), so the invoice and the books agree to the cent.
    assert [x["amount"] for x in invoice.lines[1:]] == ["0.01", "0.01", "-0.01"]
    assert invoice.total == Decimal("30.01")
    assert account(app).overage_receivable("USD") == U // 100


def test_the_last_period_of_a_subscription_canceled_at_its_end_still_bills_its_usage(app: LedgerApplication) -> None:
    run(app, "subscription.cancel", "acme", at=datetime(2026, 11, 10, tzinfo=UTC), key="m")
    debit(app, "4.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # beyond credit: owed
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])  # the tick cancels; rating's lines follow
    assert app.repository.get(subscription_id("acme", "m")).status == "canceled"
    assert (invoice.number is not None, invoice.total) == (True, Decimal("4.00"))  # no next fee, the usage
    assert [x["kind"] for x in invoice.lines] == ["usage"]
    assert account(app).unbilled_overage("USD") == {}


def test_a_canceled_subscriptions_last_period_without_usage_leaves_no_numbered_invoice(
        app: LedgerApplication) -> None:
    run(app, "subscription.cancel", "acme", at=datetime(2026, 11, 10, tzinfo=UTC), key="m")
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")
    key = f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=DEC_1, invoice_key=key, lines=[], period_start=NOV_1.isoformat(),
        period_end=DEC_1.isoformat())
    final: Invoice = app.repository.get(invoice_id("acme", key))
    assert (final.status, final.number) == ("void", None)


def test_voiding_an_unpaid_invoice_leaves_its_overage_owed_for_the_next_one(app: LedgerApplication) -> None:
    debit(app, "3.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    november = renew_and_bill(app, NOV_1, DEC_1, [usage_line("3.00")])
    assert account(app).unbilled_overage("USD") == {}
    run(app, "invoice.void", "acme", at=datetime(2026, 12, 2, tzinfo=UTC), invoice_id=str(november.id),
        reason="wrong address")
    assert sum(account(app).unbilled_overage("USD").values()) == 3 * U  # owed again, not lost
    december = renew_and_bill(app, DEC_1, JAN_1, [])
    assert [(x["kind"], x["amount"]) for x in december.lines if x["kind"] == "overage"] == [("overage", "3.00")]


def test_credit_overage_of_earlier_periods_is_billed_but_is_not_this_periods_spend_towards_its_minimum(
        tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    plan = {"code": "min", "name": "Min", "currency": "USD", "base_fee": "30.00", "minimum_spend": "20.00",
            "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]}
    run(app, "catalog.publish", None, document={**CATALOG, "plans": [plan]}, digest="c-min")
    run(app, "account.open", "acme", currency="USD")
    # October, pay as you go: 30 CREDIT used with none granted, owed.
    debit(app, "30", datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 10, 20, tzinfo=UTC), unit="CREDIT",
          meter="tokens")
    run(app, "subscription.create", "acme", key="m", plan="min")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    assert [(x["kind"], x["amount"]) for x in invoice.lines[1:]] == [
        ("usage", "5.00"), ("overage", "3.00"), ("minimum_commitment", "15.00")]  # 20.00 - November's 5.00
    assert invoice.total == Decimal("53.00")


def test_a_late_renewal_pays_its_periods_usage_posted_before_it_from_its_recurring_credits(
        app: LedgerApplication) -> None:
    debit(app, "100", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # November's 100
    # 50 tokens on Dec 5, rated into the period ahead before the Dec 1 tick ran: December's credit is not granted
    # yet, so they are owed.
    debit(app, "50", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="tokens")
    assert account(app).receivable("CREDIT") == 50 * U
    run(app, "subscription.tick", "acme", at=datetime(2026, 12, 6, tzinfo=UTC), key="m")
    # December's 100 CREDIT pays them, as with a timely tick: 50 left, nothing owed.
    after = account(app)
    assert (after.available("CREDIT"), after.receivable("CREDIT"), after.unbilled_overage("CREDIT")) == (
        50 * U, 0, {})
    [repaid] = [e for e in app.events.get(after.id) if type(e).__name__ == "OverageRepaid"]
    assert (repaid.unit, repaid.amount, repaid.periods) == ("CREDIT", 50 * U, {DEC_1.isoformat(): 50 * U})
    # December's renewal invoice bills its fee only (it billed 50 CREDIT of overage, 5.00, while 50 of
    # December's credit were voided unused at that renewal).
    january = renew_and_bill(app, DEC_1, JAN_1, [usage_line("0", meter="tokens")])
    assert [(x["kind"], x["amount"]) for x in january.lines] == [("base_fee", "30.00"), ("usage", "0.00")]
    assert january.total == Decimal("30.00")



def test_a_give_back_of_usage_a_late_renewals_credit_repaid_returns_it_to_that_credit(app: LedgerApplication) -> None:
    debit(app, "100", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # November's 100
    debit(app, "50", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="tokens")  # before the tick
    run(app, "subscription.tick", "acme", at=datetime(2026, 12, 6, tzinfo=UTC), key="m")  # December's 100 repays them
    # The 50 tokens are voided: December's credit gets them back, as when the tick was on time. They were a new
    # credit that never expires (source usage_reversal): 150 CREDIT to spend in January instead of 100.
    debit(app, "-50", DEC_1, datetime(2026, 12, 7, tzinfo=UTC), unit="CREDIT", meter="tokens")
    after = account(app)
    assert after.available("CREDIT") == 100 * U  # November's credit, all used, is open for November's late usage
    assert [(g["source"], g["remaining"]) for g in after.grant_balances() if g["status"] == "open"] == [
        ("plan_recurrence", 0), ("plan_recurrence", 100 * U)]
    renew_and_bill(app, DEC_1, JAN_1, [usage_line("0", meter="tokens")])
    # January's credit, nothing carried over (December's 100 left is open for December's late usage only).
    assert account(app).spendable("CREDIT", "tokens", JAN_1) == 100 * U


def test_an_overage_repaid_recorded_before_it_remembered_its_draw_replays_as_it_was(app: LedgerApplication) -> None:
    debit(app, "50", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="tokens")
    run(app, "subscription.tick", "acme", at=datetime(2026, 12, 6, tzinfo=UTC), key="m")
    stream = list(app.events.get(ids.account_id("acme")))
    [repaid] = [e for e in stream if type(e).__name__ == "OverageRepaid"]
    assert repaid.remembered is True
    object.__delattr__(repaid, "remembered")  # as recorded before session 8
    replayed = None
    for event in stream:
        replayed = event.mutate(replayed)
    assert replayed is not None and replayed._recent_draws.get("CREDIT", []) == []  # not remembered, as then
    assert replayed.available("CREDIT") == account(app).available("CREDIT")

def test_an_immediate_cancel_after_a_missed_renewal_pays_the_periods_usage_from_its_credits(
        app: LedgerApplication) -> None:
    debit(app, "100", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")
    debit(app, "50", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="tokens")  # before the tick
    dec_11 = datetime(2026, 12, 11, tzinfo=UTC)
    run(app, "subscription.cancel", "acme", at=dec_11, key="m", immediately=True)  # renews Dec 1 first
    # Rating's lines of the cut period [Dec 1, Dec 11): the 50 tokens, paid with December's credit.
    key = f"{subscription_id('acme', 'm')}/{dec_11.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=dec_11, invoice_key=key, lines=[usage_line("0", meter="tokens")],
        period_start=DEC_1.isoformat(), period_end=dec_11.isoformat())
    final: Invoice = app.repository.get(invoice_id("acme", key))
    # Nothing to bill (it billed the 50 CREDIT as overage, 5.00, while December's 100 were voided unused).
    assert (final.status, final.total) == ("void", Decimal("0.00"))
    assert not [x for x in final.lines if x["kind"] == "overage"]
    assert account(app).receivable("CREDIT") == 0


def test_a_trial_converted_late_pays_its_first_periods_usage_from_its_recurring_credits(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    plan = {**CATALOG["plans"][0], "trial_days": 14}
    run(app, "catalog.publish", None, document={**CATALOG, "plans": [plan]}, digest="c-trial")
    run(app, "account.open", "acme", currency="USD")
    run(app, "payment_method.add", "acme", method_id="pm_1", gateway="stripe", label="visa")
    run(app, "subscription.create", "acme", key="m", plan="team")  # trial until Nov 15
    nov_15 = datetime(2026, 11, 15, tzinfo=UTC)
    # Rated into the period the conversion starts before the ledger's tick converted it: no credit yet, owed.
    debit(app, "30", nov_15, datetime(2026, 11, 16, tzinfo=UTC), unit="CREDIT", meter="tokens")
    run(app, "subscription.tick", "acme", at=datetime(2026, 11, 17, tzinfo=UTC), key="m")
    after = account(app)
    assert (after.available("CREDIT"), after.receivable("CREDIT")) == (70 * U, 0)  # the first 100 paid them


def test_after_a_cadence_change_the_renewal_bills_the_cut_periods_usage_as_usage_not_as_credit_and_overage(
        tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    plans = [{"code": "monthly", "name": "Monthly", "currency": "USD", "base_fee": "30.00"},
             {"code": "quarterly", "name": "Quarterly", "currency": "USD", "base_fee": "90.00", "cadence": "quarter"}]
    run(app, "catalog.publish", None, document={**CATALOG, "plans": plans}, digest="c-cadence")
    run(app, "account.open", "acme", currency="USD")  # no credit of any kind, ever
    run(app, "subscription.create", "acme", key="m", plan="monthly")
    nov_16, feb_16 = datetime(2026, 11, 16, tzinfo=UTC), datetime(2027, 2, 16, tzinfo=UTC)
    debit(app, "10.00", NOV_1, datetime(2026, 11, 10, tzinfo=UTC))  # in the monthly period the change cuts
    run(app, "subscription.change", "acme", at=nov_16, key="m", plan="quarterly")  # a new period from Nov 16
    debit(app, "5.00", nov_16, datetime(2026, 11, 20, tzinfo=UTC))
    run(app, "subscription.tick", "acme", at=feb_16, key="m")
    # Rating bills the cut period's usage with the period it restarted into: one line, tracing both periods.
    lines = [{**usage_line("15.00"), "trace": {"rating_periods": [NOV_1.isoformat(), nov_16.isoformat()],
                                               "event_ids": [], "events": 2}}]
    key = f"{subscription_id('acme', 'm')}/{feb_16.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=feb_16, invoice_key=key, lines=lines,
        period_start=nov_16.isoformat(), period_end=feb_16.isoformat())
    invoice: Invoice = app.repository.get(invoice_id("acme", key))
    # It showed "Prepaid credits applied -10.00" and "Overage from earlier periods 10.00" (same total).
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [("base_fee", "90.00"), ("usage", "15.00")]
    assert invoice.total == Decimal("105.00")
    assert account(app).unbilled_overage("USD") == {}


LOCALIZED = {"code": "euro", "name": "Euro", "currency": "USD", "base_fee": "30.00", "prices": {"EUR": "27.00"},
             "charges": [{"meter": "tokens", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "1"}}],
             "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]}


def test_a_localized_plan_bills_credit_overage_at_the_credit_price_in_its_currency(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    units = {"CREDIT": {"scale": 2, "list_price": "0.10", "currency": "USD", "list_prices": {"EUR": "0.09"}}}
    run(app, "catalog.publish", None, document={**CATALOG, "credit_units": units, "plans": [LOCALIZED]},
        digest="c-eur")
    run(app, "account.open", "acme", currency="EUR")
    run(app, "subscription.create", "acme", key="m", plan="euro")
    debit(app, "150", NOV_1, datetime(2026, 11, 20, tzinfo=UTC), unit="CREDIT", meter="tokens")  # 100 granted
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    assert invoice.currency == "EUR"
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [("base_fee", "27.00"), ("usage", "0.00"),
                                                                 ("overage", "4.50")]  # 50 CREDIT at 0.09 EUR


def test_a_localized_plan_whose_credit_overage_has_no_price_in_its_currency_is_refused(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    refused = run(app, "catalog.publish", None, outcome="rejected", document={**CATALOG, "plans": [LOCALIZED]},
                  digest="c-eur")  # CREDIT is priced in USD only: EUR invoices could not bill its overage
    assert refused.reason == "invalid_catalog" and "no list price in EUR" in refused.detail


def test_a_credit_list_price_without_currency_is_in_the_plans_own_currency_only(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    units = {"CREDIT": {"scale": 2, "list_price": "0.10"}}  # no currency: the plans' own (USD)
    refused = run(app, "catalog.publish", None, outcome="rejected",
                  document={**CATALOG, "credit_units": units, "plans": [LOCALIZED]}, digest="c-eur")
    assert "no list price in EUR" in refused.detail  # not 0.10 EUR each
    run(app, "catalog.publish", None, document={**CATALOG, "credit_units": units}, digest="c-usd")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "150", NOV_1, datetime(2026, 11, 20, tzinfo=UTC), unit="CREDIT", meter="tokens")
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    assert [x["amount"] for x in invoice.lines if x["kind"] == "overage"] == ["5.00"]  # in USD, the plan's own


def test_a_secondary_subscriptions_final_invoice_takes_none_of_the_accounts_overage(app: LedgerApplication) -> None:
    nov_10, nov_20 = datetime(2026, 11, 10, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)
    run(app, "subscription.create", "acme", at=nov_10, key="b", plan="team")  # m (from Nov 1) is the primary
    debit(app, "12.00", NOV_1, datetime(2026, 11, 15, tzinfo=UTC))  # rated into m's open period
    run(app, "subscription.cancel", "acme", at=nov_20, key="b", immediately=True)
    # Rating: b is not the primary subscription, its final usage lines are empty and say so.
    final_key = f"{subscription_id('acme', 'b')}/{nov_20.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=nov_20, invoice_key=final_key, lines=[], primary=False,
        period_start=nov_10.isoformat(), period_end=nov_20.isoformat())
    final: Invoice = app.repository.get(invoice_id("acme", final_key))
    assert not [item for item in final.lines if item["kind"] in ("overage", "credits_applied")]  # was 12.00
    assert account(app).invoiced_overage(str(final.id)) == {}
    # m's renewal bills its own period's usage: 12.00 beyond its credit, no "Prepaid credits applied" offset.
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("12.00")])
    assert [(item["kind"], item["amount"]) for item in renewal.lines if item["kind"] != "base_fee"] == [
        ("usage", "12.00")]
    assert renewal.total == Decimal("42.00")
    bad = run(app, "invoice.usage_lines", "acme", at=DEC_1, outcome="rejected", invoice_key=final_key, lines=[],
              primary="no")
    assert bad.reason == "invalid_usage_lines", bad


@pytest.mark.parametrize("kind", ["tax", "credits_applied", "overage", "minimum_commitment", "base_fee"])
def test_usage_lines_carrying_a_line_only_the_ledger_writes_are_refused_and_change_nothing(
        app: LedgerApplication, kind: str) -> None:
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")
    key = f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"
    refused = run(app, "invoice.usage_lines", "acme", at=DEC_1, outcome="rejected", invoice_key=key,
                  lines=[usage_line("1.00"), {"kind": kind, "description": "mine", "amount": "-100.00"}],
                  period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat())
    assert refused.reason == "invalid_command"
    draft: Invoice = app.repository.get(invoice_id("acme", key))
    assert (draft.status, [x["kind"] for x in draft.lines]) == ("draft", ["base_fee"])


SCOPED: dict[str, Any] = {
    **CATALOG,
    "meters": [*CATALOG["meters"],
               {"code": "images", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "1"}}],
    "plans": [{**CATALOG["plans"][0], "recurring_credits": [{"unit": "CREDIT", "amount": "100", "scope": ["tokens"]}]}],
}


def test_a_late_renewals_credit_for_some_meters_pays_its_periods_usage_of_those_meters_only(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(app, "catalog.publish", None, document=SCOPED, digest="c-scoped")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="team")  # 100 CREDIT a month, for tokens only
    debit(app, "100", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # November's 100
    # Rated into December before the Dec 1 tick ran: 50 tokens (December's credit covers them) and 20 images (no
    # credit of the plan covers images), all owed for now.
    debit(app, "50", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="tokens")
    debit(app, "20", DEC_1, datetime(2026, 12, 5, tzinfo=UTC), unit="CREDIT", meter="images")
    assert account(app).unbilled_overage_meters("CREDIT") == {DEC_1.isoformat(): {"tokens": 50 * U, "images": 20 * U}}
    run(app, "subscription.tick", "acme", at=datetime(2026, 12, 6, tzinfo=UTC), key="m")
    # December's 100 CREDIT for tokens pays the 50 tokens, as with a timely tick; the images stay owed. It repaid
    # nothing: 70 CREDIT owed, 100 unused.
    after = account(app)
    assert (after.available("CREDIT"), after.receivable("CREDIT")) == (50 * U, 20 * U)
    assert after.unbilled_overage("CREDIT") == {DEC_1.isoformat(): 20 * U}
    [repaid] = [e for e in app.events.get(after.id) if type(e).__name__ == "OverageRepaid"]
    assert (repaid.amount, repaid.meters) == (50 * U, {DEC_1.isoformat(): {"tokens": 50 * U}})
    # December's invoice bills the 20 images as overage (2.00), not the tokens (it billed 7.00).
    january = renew_and_bill(app, DEC_1, JAN_1, [usage_line("0", meter="tokens"), usage_line("0", meter="images")])
    assert [(x["kind"], x["amount"]) for x in january.lines if x["kind"] == "overage"] == [("overage", "2.00")]
    assert january.total == Decimal("32.00")


def test_an_upgrades_credits_granted_from_the_change_do_not_pay_the_periods_usage_from_before_it(
        app: LedgerApplication) -> None:
    pro = {"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "90.00",
           "recurring_credits": [{"unit": "CREDIT", "amount": "500"}]}
    run(app, "catalog.publish", None, document={**CATALOG, "plans": [*CATALOG["plans"], pro]}, digest="c-pro")
    debit(app, "150", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # 50 beyond
    run(app, "subscription.change", "acme", at=datetime(2026, 11, 16, tzinfo=UTC), key="m", plan="pro")
    # 500 x 1/2 for the rest of November less the 50 of the old allotment used ahead of time; no credit of either
    # plan existed for the 50 beyond it on Nov 10: owed, as the renewal invoice bills it (not a late renewal's).
    after = account(app)
    assert (after.available("CREDIT"), after.receivable("CREDIT")) == (200 * U, 50 * U)
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    assert [x["amount"] for x in invoice.lines if x["kind"] == "overage"] == ["5.00"]


def credit_usage_line(credits: str, meter: str = "tokens", legacy: bool = False) -> dict[str, Any]:
    """Rating's line of a meter priced in CREDIT (as it sends it; ``legacy``: as it sent it before session 9)."""
    if legacy:
        return {**usage_line("0", meter=meter), "description": f"{meter}: {credits} tokens (paid with {credits} CREDIT)"}
    return {**usage_line("0", meter=meter), "description": f"{meter}: {credits} tokens ({credits} CREDIT)",
            "credits": credits, "credits_unit": "CREDIT"}


@pytest.mark.parametrize("legacy", [False, True])
def test_usage_paid_with_credits_in_part_says_how_much_credit_paid_and_how_much_went_beyond_it(
        app: LedgerApplication, legacy: bool) -> None:
    debit(app, "150", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # 100 granted
    invoice = renew_and_bill(app, NOV_1, DEC_1, [credit_usage_line("150.000000000", legacy=legacy)])
    # It said "paid with 150 CREDIT" above a line billing 50 of them as overage.
    assert [(x["kind"], x["description"], x["amount"]) for x in invoice.lines if x["kind"] != "base_fee"] == [
        ("usage", "tokens: 150.000000000 tokens (paid with 100 CREDIT, 50 CREDIT beyond prepaid credit)", "0.00"),
        ("overage", "50 CREDIT used beyond prepaid credit, at 0.10 USD each", "5.00")]
    [usage] = [x for x in invoice.lines if x["kind"] == "usage"]
    assert (usage["credits_paid"], usage["credits_beyond"]) == ("100", "50")
    assert invoice.total == Decimal("35.00")


def test_each_credit_priced_meter_names_its_own_overage(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(app, "catalog.publish", None, document={**SCOPED, "plans": CATALOG["plans"]}, digest="c-two")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="team")  # 100 CREDIT, any meter
    debit(app, "80", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")
    debit(app, "40", NOV_1, datetime(2026, 11, 11, tzinfo=UTC), unit="CREDIT", meter="images")  # 20 beyond
    invoice = renew_and_bill(app, NOV_1, DEC_1, [credit_usage_line("80"),
                                                  credit_usage_line("40", meter="images")])
    assert [x["description"] for x in invoice.lines if x["kind"] == "usage"] == [
        "tokens: 80 tokens (paid with 80 CREDIT)",
        "images: 40 tokens (paid with 20 CREDIT, 20 CREDIT beyond prepaid credit)"]
    assert [x["amount"] for x in invoice.lines if x["kind"] == "overage"] == ["2.00"]


def _books(app: LedgerApplication) -> tuple[int, int, list[str]]:
    """CREDIT available and owed, and November's overage line as December's renewal bills it."""
    after = account(app)
    books = (after.available("CREDIT"), after.receivable("CREDIT"))
    invoice = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    return (*books, [x["amount"] for x in invoice.lines if x["kind"] == "overage"])


def _with_pro(app: LedgerApplication) -> None:
    pro = {"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "90.00",
           "recurring_credits": [{"unit": "CREDIT", "amount": "500"}]}
    run(app, "catalog.publish", None, document={**CATALOG, "plans": [*CATALOG["plans"], pro]}, digest="c-pro")


@pytest.mark.parametrize("backdated", [False, True])
def test_an_upgrade_given_an_earlier_at_than_usage_posted_beyond_credit_repays_it_as_on_time(
        app: LedgerApplication, backdated: bool) -> None:
    _with_pro(app)
    nov_16, nov_20 = datetime(2026, 11, 16, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)
    debit(app, "120", NOV_1, datetime(2026, 11, 10, tzinfo=UTC), unit="CREDIT", meter="tokens")  # 20 beyond
    if not backdated:
        run(app, "subscription.change", "acme", at=nov_16, key="m", plan="pro")
    debit(app, "30", NOV_1, nov_20, unit="CREDIT", meter="tokens")
    if backdated:  # the same change, sent after the Nov 20 usage was posted (30 more beyond credit then)
        run(app, "subscription.change", "acme", at=nov_16, key="m", plan="pro")
    # 500 x 1/2 less the 50 of the old allotment used ahead of time: 200, of which the Nov 20 usage takes 30; the
    # 20 beyond credit on Nov 10 had no credit of either plan: billed (the backdated change left 50 owed, 200 unused).
    assert _books(app) == (170 * U, 20 * U, ["2.00"])


@pytest.mark.parametrize("backdated", [False, True])
def test_a_resume_given_an_earlier_at_than_usage_posted_beyond_credit_repays_it_as_on_time(
        app: LedgerApplication, backdated: bool) -> None:
    nov_10 = datetime(2026, 11, 10, tzinfo=UTC)
    debit(app, "100", NOV_1, datetime(2026, 11, 2, tzinfo=UTC), unit="CREDIT", meter="tokens")  # the 100 granted
    run(app, "subscription.pause", "acme", at=nov_10, key="m")
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")  # December unbilled, no credit
    dec_10, dec_16, dec_20 = (datetime(2026, 12, d, tzinfo=UTC) for d in (10, 16, 20))
    debit(app, "10", DEC_1, dec_10, unit="CREDIT", meter="tokens")  # while paused: owed
    if not backdated:
        run(app, "subscription.resume", "acme", at=dec_16, key="m")
    debit(app, "30", DEC_1, dec_20, unit="CREDIT", meter="tokens")
    if backdated:
        run(app, "subscription.resume", "acme", at=dec_16, key="m")
    after = account(app)
    # December's credit from the resume, 100 x 16/31 = 51.612903226, pays the Dec 20 usage; Dec 10's (while paused)
    # stays owed. The backdated resume left the 30 owed too, its credit unused.
    assert (after.available("CREDIT"), after.receivable("CREDIT")) == (21_612_903_226, 10 * U)
    assert after.unbilled_overage("CREDIT") == {DEC_1.isoformat(): 10 * U}
