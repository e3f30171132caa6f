"""A plan's recurring credit in its own billing currency (30.00 a month including 10.00 of usage credit) is a
separate performance obligation (IFRS 15): its share of the fee is earned as the credit is used (or lapses to
breakage), the rest of the fee ratably over the period. Over a whole period recognised revenue + breakage from
the invoice is exactly the fee and its deferred revenue ends at zero. SQLite ledger, real commands; the chart of
accounts is read from the account's events' postings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from billing_events.messages import PaymentNotification
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.limits import RECURRING_CREDIT_LATE_USAGE_DAYS
from billing_ledger.payment_commands import payment_command
from billing_rating.catalog_view import build_view
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.subscriptions.test_fee_revenue_recognition import replays_and_snapshots_the_same
from tests.unit.subscriptions.test_invoice_books import account, books, events
from tests.unit.subscriptions.test_invoice_overage import debit, renew_and_bill, run

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
# How long after its period's end a plan credit without rollover lapses (open for the period's late usage till then).
LAPSES = timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00",
               "recurring_credits": [{"unit": "USD", "amount": "10.00"}]}],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="included-1")
    run(ledger, "account.open", "acme", currency="USD")
    return ledger


def recognise(app: LedgerApplication, now: datetime) -> None:
    run(app, "grant.expire", "acme", at=now, now=now.isoformat())
    run(app, "money.recognise", "acme", at=now, now=now.isoformat())


def revenue(app: LedgerApplication) -> tuple[int, int, int]:
    """(recognised, breakage, deferred) revenue of the account's books in USD, as positive sub-units (credits)."""
    chart = books(app)
    return (-chart.get(("recognised_revenue", "USD"), 0), -chart.get(("breakage", "USD"), 0),
            -chart.get(("deferred_revenue", "USD"), 0))


def test_a_period_whose_included_credit_is_partly_used_earns_exactly_its_fee(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # Nov 1 - Dec 1: 30.00, 10.00 of credit
    debit(app, "4.00", NOV_1, NOV_20)  # from the included credit
    recognise(app, DEC_1 + LAPSES)  # the credit's 6.00 left lapses after the period's late usage
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0  # was -10.00: the grant's funding left a debit in deferred revenue
    assert recognised + breakage == 3000 * CENT  # was 40.00: the credit's share recognised twice
    assert (recognised, breakage) == (2400 * CENT, 600 * CENT)
    assert verify_store(app, "acme").ok


def fee_deferred(app: LedgerApplication) -> int:
    """What the account's fee schedules still defer for ratable recognition (sub-units)."""
    return account(app).deferred_fees("USD")


def test_a_renewal_leaves_the_ended_credit_open_for_late_usage_and_the_sweep_lapses_it_once_after_that(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    renew_and_bill(app, NOV_1, DEC_1, [])  # the tick comes first
    recognise(app, DEC_1)
    # November's 6.00 left stays open for November's late usage (before session 13 the renewal expired it).
    assert revenue(app)[1] == 0 and not events(app, "GrantExpired")
    # December's 30.00: its 10.00 of credit is in the wallet, the other 20.00 deferred to recognise over December.
    assert fee_deferred(app) == 2000 * CENT
    debit(app, "1.00", DEC_1, DEC_1 + timedelta(days=2))  # December's usage draws December's credit only
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("open", 600 * CENT), ("open", 900 * CENT)]
    recognise(app, DEC_1 + LAPSES - timedelta(seconds=1))
    assert not events(app, "GrantExpired")
    recognise(app, DEC_1 + LAPSES)
    recognise(app, DEC_1 + LAPSES + timedelta(hours=1))
    assert [e.remainder for e in events(app, "GrantExpired")] == [600 * CENT]  # once
    recognised, breakage, deferred = revenue(app)
    # November exactly its fee (20.00 ratably, 4.00 used, 6.00 lapsed); December 20.00 ratably and 1.00 used, its
    # 9.00 of credit still open (in the wallet) for December's late usage, set aside since its period ended on Jan 1
    # (no renewal here): not available to new usage.
    assert (recognised, breakage, deferred) == ((2400 + 2100) * CENT, 600 * CENT, 0)
    assert (account(app).available("USD"), account(app).late_usage_reserve("USD")) == (0, 900 * CENT)
    assert verify_store(app, "acme").ok


def test_a_cancel_mid_period_earns_the_fee_less_its_credit_whatever_of_the_included_credit_was_used(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=9))
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)  # 15 of 30 days: 15.00 back
    # The credit note; the included credit's 6.00 left is set aside for usage of before the cancel that comes late.
    assert (account(app).available("USD"), account(app).late_usage_reserve("USD")) == (1500 * CENT, 600 * CENT)
    recognise(app, NOV_16 + LAPSES)  # ... and lapses after that usage's window (since session 14)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0  # was 10.00 of debit: the 6.00 credit voided back stayed there
    assert recognised + breakage == 1500 * CENT  # November: 30.00 less the 15.00 credited
    assert breakage == 600 * CENT
    assert account(app).available("USD") == account(app).balance("USD") == 1500 * CENT
    assert verify_store(app, "acme").ok


def test_an_upgrade_mid_period_earns_both_plans_fees_for_their_time_with_their_included_credit(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=9))
    run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)  # -15.00 unused, +45.00 rest
    # The new grant: 15.00 for the rest of the period (3 x 10.00 for half of it) and 1.00 carried (6.00 left of the
    # old one beyond its 5.00 for the rest); 45.00 - 15.00 of the new fee deferred, the old schedule ended.
    assert account(app).available("USD") == 1600 * CENT
    assert fee_deferred(app) == 3000 * CENT
    debit(app, "12.00", NOV_1, NOV_20)
    recognise(app, DEC_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0
    assert recognised + breakage == (3000 - 1500 + 4500) * CENT
    assert breakage == 400 * CENT  # the 4.00 of credit never used
    assert verify_store(app, "acme").ok


def test_a_fee_paid_before_access_takes_its_included_credit_out_of_the_schedule_when_granted(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", trial=False, collection="charge_before_access")
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    assert fee_deferred(app) == 3000 * CENT  # not paid, nothing granted: the whole fee waits
    paid_at = datetime(2026, 11, 4, 12, tzinfo=UTC)
    run(app, "invoice.mark_paid", "acme", at=paid_at, invoice_id=str(invoice.id), payment="pi_1")
    assert fee_deferred(app) == 2000 * CENT and account(app).available("USD") == 1000 * CENT
    debit(app, "7.00", paid_at, paid_at + timedelta(days=3))
    recognise(app, paid_at + timedelta(days=30) + LAPSES)
    assert revenue(app) == (2700 * CENT, 300 * CENT, 0)
    assert verify_store(app, "acme").ok


def test_an_unpaid_fee_before_access_voided_reverses_the_whole_fee(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", trial=False, collection="charge_before_access")
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m")
    assert books(app) == {}
    assert verify_store(app, "acme").ok


def test_a_cancel_while_the_renewal_is_a_draft_leaves_nothing_deferred(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    recognise(app, DEC_1)
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")  # December's credit granted, its invoice a draft
    debit(app, "2.00", DEC_1, DEC_1 + timedelta(days=2))
    cancel_at = DEC_1 + timedelta(days=10)
    run(app, "subscription.cancel", "acme", at=cancel_at, key="m", immediately=True)  # 21 of 31 days: 20.32 back
    key = f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=cancel_at + timedelta(hours=1), invoice_key=key, lines=[],
        period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat())
    recognise(app, JAN_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0
    assert recognised + breakage == (3000 + 3000 - 2032) * CENT  # November, December less its credit
    assert verify_store(app, "acme").ok


def test_a_full_refund_gives_back_the_fee_once_and_leaves_nothing_deferred(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    run(app, "invoice.mark_paid", "acme", at=NOV_1, invoice_id=str(invoice.id), payment="pi_1")
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=5))
    recognise(app, NOV_1 + timedelta(days=9))
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt_re", kind="refund_succeeded", tenant="acme",
                                 order_id=str(invoice.id), invoice_id=str(invoice.id), amount=Decimal("30.00"),
                                 currency="USD", verified_at=NOV_16, gateway_reference="re_1",
                                 refunded_payment="pi_1")
    [result] = app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result
    assert revenue(app)[2] == 0 and fee_deferred(app) == 0
    recognise(app, DEC_1 + LAPSES)  # the included credit left lapses
    # Every cent of the fee went back: the period earned nothing, the 4.00 used and 6.00 lapsed net to zero.
    assert revenue(app) == (-600 * CENT, 600 * CENT, 0)
    assert ("gateway_clearing", "USD") not in books(app)  # paid 30.00, refunded 30.00
    assert verify_store(app, "acme").ok


def test_a_replay_and_a_snapshot_rebuild_the_same_schedules(app: LedgerApplication, tmp_path: Path) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    [billed] = events(app, "InvoiceBilled")
    # The event records what it deferred ratably and the included share: a replay never recomputes it, so an
    # InvoiceBilled recorded before (its whole fee on the schedule, no ``included``) replays as it was.
    assert billed.revenue["schedule"]["amount"] == 2000 * CENT and billed.revenue["included"]["amount"] == 1000 * CENT
    debit(app, "4.00", NOV_1, NOV_20)
    run(app, "subscription.change", "acme", at=NOV_20, key="m", quantity=2)
    replays_and_snapshots_the_same(app, tmp_path)


def test_a_plan_whose_included_credit_is_above_its_fee_is_refused_and_changes_nothing(
        app: LedgerApplication) -> None:
    generous = {**CATALOG, "plans": [{**CATALOG["plans"][0], "base_fee": "30.00",
                                      "recurring_credits": [{"unit": "USD", "amount": "20.00"},
                                                            {"unit": "USD", "amount": "15.00"}]}]}
    result = run(app, "catalog.publish", None, outcome="rejected", document=generous, digest="generous")
    assert result.reason == "invalid_catalog"
    assert "includes 35.00 USD of recurring credit per period but its base_fee is 30.00" in result.detail
    assert app.repository.get(Catalog.create_id()).digest == "included-1"
    # Before, its 35.00 were granted for 30.00 billed: 5.00 funded from deferred revenue nothing had put there.
    run(app, "subscription.create", "acme", key="m", plan="team")
    assert account(app).available("USD") == 1000 * CENT
    # As much credit as the fee (all of it earned as used), or more in a credit unit, is accepted.
    whole = {**CATALOG, "credit_units": {"CREDIT": {"scale": 0, "list_price": "0.01", "currency": "USD"}},
             "plans": [{**CATALOG["plans"][0], "recurring_credits": [{"unit": "USD", "amount": "30.00"},
                                                                     {"unit": "CREDIT", "amount": "5000"}]}]}
    run(app, "catalog.publish", None, document=whole, digest="whole")
    # A catalogue published before the check was added is still read as it was (rating reads it back).
    assert build_view(1, generous, {}).document == generous


ROLLOVER: dict[str, Any] = {
    "meters": CATALOG["meters"],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00",
               "recurring_credits": [{"unit": "USD", "amount": "10.00", "rollover": True, "rollover_cap": "2.00"}]}],
}


def rollover_app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=ROLLOVER, digest="included-rollover")
    run(ledger, "account.open", "acme", currency="USD")
    return ledger


def test_a_renewal_lapses_the_credit_above_the_rollover_cap_to_breakage_once(tmp_path: Path) -> None:
    app = rollover_app(tmp_path)
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)  # 6.00 of November's 10.00 left: 2.00 carried, 4.00 above the cap
    renew_and_bill(app, NOV_1, DEC_1, [])
    recognise(app, DEC_1)
    recognised, breakage, deferred = revenue(app)
    # November's 30.00: 20.00 ratably, 4.00 used, 2.00 carried into December's grant; the 4.00 above the cap stays
    # set aside for November's late usage (since session 14) and lapses after its window.
    assert (recognised, breakage) == (2400 * CENT, 0)
    assert deferred == fee_deferred(app) == 2000 * CENT  # was 24.00: 4.00 no schedule accounts for
    assert (account(app).available("USD"), account(app).late_usage_reserve("USD")) == (1200 * CENT, 400 * CENT)
    [kept] = events(app, "GrantKeptForLateUsage")
    assert (kept.moved, kept.carry, kept.expires_at) == (200 * CENT, 200 * CENT, DEC_1 + LAPSES)
    recognise(app, DEC_1 + timedelta(days=45))  # the sweeper after December: November's 4.00 lapses, once
    assert revenue(app)[1] == 400 * CENT
    assert [e.remainder for e in events(app, "GrantExpired")] == [400 * CENT]
    renew_and_bill(app, DEC_1, JAN_1, [])
    recognise(app, JAN_1)
    run(app, "grant.expire", "acme", at=JAN_1 + LAPSES, now=(JAN_1 + LAPSES).isoformat())  # December's 10.00 lapses
    recognised, breakage, deferred = revenue(app)
    # December: 20.00 ratably, nothing used, 12.00 left: 2.00 carried, 10.00 above the cap lapses.
    assert (recognised, breakage) == (4400 * CENT, 1400 * CENT)
    assert deferred == fee_deferred(app) == 2000 * CENT
    assert recognised + breakage + deferred + account(app).balance("USD") == billed(app)
    assert verify_store(app, "acme").ok
    app.close()


def test_a_cancel_at_the_period_end_lapses_a_rollover_credit_left(tmp_path: Path) -> None:
    app = rollover_app(tmp_path)
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    run(app, "subscription.cancel", "acme", at=NOV_20, key="m")  # at the period's end
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")
    recognise(app, DEC_1 + timedelta(days=45))
    assert revenue(app) == (2400 * CENT, 600 * CENT, 0)  # deferred was 6.00: the rollover credit voided back
    assert account(app).balance("USD") == 0
    assert verify_store(app, "acme").ok
    app.close()


def test_a_cancel_after_a_full_refund_leaves_nothing_deferred_and_the_period_earns_nothing(
        app: LedgerApplication) -> None:
    paid_used_and_refunded(app)
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)  # nothing left to credit
    recognise(app, NOV_16 + LAPSES)  # the credit left lapses after the late usage of before the cancel
    # The refund gave the whole fee back; the 4.00 used and the 6.00 the cancel voided net to zero, as if lapsed.
    assert revenue(app) == (-600 * CENT, 600 * CENT, 0)  # deferred was 6.00: the voided credit went back there
    assert account(app).balance("USD") == 0 and fee_deferred(app) == 0
    assert ("gateway_clearing", "USD") not in books(app)
    assert verify_store(app, "acme").ok


def test_a_cancel_after_the_invoice_was_voided_leaves_nothing_deferred(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=5))
    run(app, "invoice.void", "acme", at=NOV_1 + timedelta(days=9), invoice_id=str(invoice.id))
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    recognise(app, NOV_16 + LAPSES)
    assert revenue(app) == (-600 * CENT, 600 * CENT, 0)  # deferred was 6.00
    assert books(app).get(("receivables", "USD"), 0) == 0
    assert verify_store(app, "acme").ok


def test_a_cancel_after_an_upgrades_invoice_was_voided_credits_the_first_invoice_and_leaves_nothing_deferred(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 including 10.00 of credit
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=9))
    changed = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)  # -15.00 unused, +45.00 rest
    upgrade = invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{changed.command_id}")
    run(app, "invoice.void", "acme", at=NOV_16 + timedelta(days=1), invoice_id=str(upgrade))
    result = run(app, "subscription.cancel", "acme", at=NOV_20 + timedelta(days=1), key="m", immediately=True)
    # The unused Nov 21 - Dec 1 of the first invoice (was none: the cancel credited the voided upgrade's invoice).
    assert [item["amount"] for item in result.value["lines"]] == ["-10.00"]
    recognise(app, DEC_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0 and fee_deferred(app) == 0
    assert recognised + breakage == 2000 * CENT  # November's 30.00 less the 10.00 credited (was all 30.00)
    chart = books(app)
    assert chart[("receivables", "USD")] + chart[("tenant_wallet", "USD")] == 2000 * CENT
    assert verify_store(app, "acme").ok


@pytest.mark.parametrize(("used", "granted"), [("4.00", "11.00"), ("8.00", "7.00")])
def test_a_change_after_the_invoice_was_voided_credits_nothing_and_leaves_nothing_deferred(
        app: LedgerApplication, used: str, granted: str) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 including 10.00 of credit
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    debit(app, used, NOV_1, NOV_1 + timedelta(days=5))
    run(app, "invoice.void", "acme", at=NOV_1 + timedelta(days=9), invoice_id=str(invoice.id))  # goodwill
    result = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    # Two seats' rest of the period, 20.00 of credit included, nothing credited (was -15.00 of the voided invoice).
    assert [item["amount"] for item in result.value["lines"]] == ["30.00"]
    # The new grant is what it is without the void: the new allotment (10.00) plus what is left of the old one
    # beyond its share of Nov 1 - Nov 16 (5.00), negative when more was used; the old share of the rest lapses.
    assert account(app).available("USD") == int(Decimal(granted) * U)
    debit(app, "3.00", NOV_1, NOV_20)
    recognise(app, DEC_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0 and fee_deferred(app) == 0  # was 5.00 left deferred
    assert recognised + breakage == 3000 * CENT  # the change's invoice, all that was billed (was 15.00 billed)
    chart = books(app)
    assert chart[("receivables", "USD")] == 3000 * CENT and ("tenant_wallet", "USD") not in chart
    assert verify_store(app, "acme").ok


def test_a_change_after_a_full_refund_lapses_the_old_credits_rest_and_leaves_nothing_deferred(
        app: LedgerApplication) -> None:
    paid_used_and_refunded(app)
    result = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    assert [item["amount"] for item in result.value["lines"]] == ["30.00"]  # nothing left of November to credit
    assert account(app).available("USD") == 1100 * CENT  # 10.00 for the rest at two seats + 1.00 unused beyond
    recognise(app, DEC_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0 and fee_deferred(app) == 0  # was 5.00: the old credit's rest voided back, never taken out
    assert recognised + breakage == 3000 * CENT  # the change's 30.00; November's fee went back with the refund
    assert verify_store(app, "acme").ok


@pytest.mark.parametrize(("action", "earned"), [("cancel", 0), ("change", 6000 * CENT)])
def test_a_credit_capped_by_a_partial_refund_still_takes_the_whole_included_credits_rest_out_of_deferred_revenue(
        app: LedgerApplication, action: str, earned: int) -> None:
    """30.00 with 10.00 included, paid, 4.00 used, 24.90 refunded: a cancel or upgrade on Nov 11 credits 5.10 of the
    20.00 unused (what is left to give back). ``included_back`` is not that credit's share: it is what the close of
    the old grants put back into ``deferred_revenue`` (6.00 left, less what the new grants carry, plus the new fee's
    included credit; a cancel's, since session 14, nothing: the 6.00 stays for late usage and lapses), and it must
    leave there whole; the credit's amount only moves ``recognised_revenue``. Capped at the 5.10 credited, 0.90 would
    stay deferred with no schedule or credit behind it."""
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=5))
    pay_and_refund(app, invoice.id, 83, NOV_1 + timedelta(days=9))  # 24.90 of 30.00: 5.10 left to give back
    at = NOV_1 + timedelta(days=10)
    if action == "cancel":
        result = run(app, "subscription.cancel", "acme", at=at, key="m", immediately=True)
        assert [item["amount"] for item in result.value["lines"]] == ["-5.10"]  # of 20.00 unused
    else:
        result = run(app, "subscription.change", "acme", at=at, key="m", quantity=3)
        assert [item["amount"] for item in result.value["lines"]] == ["-5.10", "60.00"]
    recognise(app, DEC_1 + LAPSES)
    recognised, breakage, deferred = revenue(app)
    assert deferred == 0 and fee_deferred(app) == 0
    # Fees billed (30.00, and the upgrade's 60.00) less the refund (24.90) and the credit (5.10).
    assert recognised + breakage == billed(app) - account(app).balance("USD") == earned
    assert verify_store(app, "acme").ok


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(periods=st.lists(st.tuples(
    st.lists(st.tuples(st.integers(1, 29), st.integers(0, 600)), max_size=4),  # usage: day, cents
    st.lists(st.integers(1, 29), max_size=3),  # recognition runs (with the expiry sweep): days
    st.integers(0, 600),  # cents of usage in the period's last hour that reach the ledger after its renewal
    st.booleans(),  # the sweep at the period's end before the renewal's tick
    st.sampled_from([None, 1, 2, 3]),  # a quantity change at day 12, or none
    st.sampled_from([None, 30, 50, 90, 100])), min_size=1, max_size=3),  # % of the period's invoice refunded at day 8
    cancel=st.booleans(), rollover=st.booleans(), void_last=st.booleans(),
    refund_last=st.sampled_from([None, 30, 50, 90, 100]))
def test_fees_are_recognised_exactly_once_across_renewals_use_expiry_changes_and_recognition(
        tmp_path_factory: pytest.TempPathFactory, periods: list[tuple[Any, ...]], cancel: bool, rollover: bool,
        void_last: bool, refund_last: int | None) -> None:
    """fees = recognised + breakage + what is still deferred (the fee schedules) + the credit in the wallet
    (included credit, credit notes, credit rolled over), deferred revenue never a debit and never more or less
    than the schedules defer, at every step; at the end nothing deferred and recognised + breakage = the fees less
    the credit for unused time. ``rollover``: the credit rolls over, capped at 2.00 (the rest lapses at each
    renewal); ``void_last``: the last period's invoice is voided (when no change credited part of it nor a refund
    paid it back) before the cancel, which then credits nothing; else ``refund_last`` % of it is paid back by the
    gateway. A period's invoice may be paid and refunded in part or in full before its change too: the change's or
    the cancel's credit for unused time is then capped by what the invoice has left to give back, and the books
    end the same. Usage within the period's credit never goes beyond it, also when it reaches the ledger after the
    renewal and the sweep (a close debit, late usage): the credit without rollover stays open for it (since session
    13), and a rollover credit's rest too, then its carry in the next grant (since session 14)."""
    app = LedgerApplication(persistence_env(None, str(tmp_path_factory.mktemp("prop"))))
    try:
        run(app, "catalog.publish", None, document=ROLLOVER if rollover else CATALOG, digest="included-1")
        run(app, "account.open", "acme", currency="USD")
        run(app, "subscription.create", "acme", key="m", plan="team")

        def check() -> None:
            recognised, breakage, deferred = revenue(app)
            assert deferred >= 0 and deferred == fee_deferred(app)
            assert recognised + breakage + deferred + account(app).balance("USD") == billed(app)
            assert account(app).overage_receivable("USD") == 0  # usage only within the credit drawable at its time

        def late(amount: int, at: datetime) -> Callable[[], None]:
            return lambda: debit(app, str(Decimal(amount) / U), start, at) if amount else None

        start = NOV_1
        for usage, runs, late_cents, sweep_first, quantity, refund in periods:
            end = (start + timedelta(days=32)).replace(day=1)
            steps = sorted([(day, "use", cents) for day, cents in usage] + [(day, "recognise", 0) for day in runs]
                           + ([(8, "refund", refund)] if refund is not None else [])
                           + ([(12, "change", quantity)] if quantity is not None else []), key=lambda x: x[0])
            for day, kind, value in steps:
                at = start + timedelta(days=day, hours=1)
                if kind == "use":
                    amount = min(value * CENT, account(app).spendable("USD", "api_calls", at))
                    if amount:
                        debit(app, str(Decimal(amount) / U), start, at)
                elif kind == "recognise":
                    recognise(app, at)
                elif kind == "refund":
                    pay_and_refund(app, invoice_id("acme", f"{subscription_id('acme', 'm')}/{start.isoformat()}"),
                                   value, at)
                elif value != app.repository.get(subscription_id("acme", "m")).quantity:
                    run(app, "subscription.change", "acme", at=at, key="m", quantity=value)
                check()
            last_hour = end - timedelta(hours=1)
            # Usage of the period's last hour, within what credit it can draw then, reaches the ledger after the sweep
            # and the renewal (as a close debit always does).
            late_usage = late(min(late_cents * CENT, account(app).spendable("USD", "api_calls", last_hour)), last_hour)
            if sweep_first:
                recognise(app, end)
            last = renew_and_bill(app, start, end, [], usage_before_lines=late_usage)
            recognise(app, end)
            check()
            start = end
        if void_last and not last.corrections and app.repository.get(last.id).status == "finalized":
            run(app, "invoice.void", "acme", at=start + timedelta(days=3), invoice_id=str(last.id))
            check()
        elif refund_last is not None:
            pay_and_refund(app, last.id, refund_last, start + timedelta(days=3))
            check()
        if cancel:
            run(app, "subscription.cancel", "acme", at=start + timedelta(days=5), key="m", immediately=True)
            check()
        elif rollover:
            # A rollover credit is closed by the renewal that ends its period, never by the sweep (since session 12):
            # the last period ends with the subscription (canceled at its end), so its credit lapses whole.
            run(app, "subscription.cancel", "acme", at=start + timedelta(days=5), key="m", immediately=False)
            run(app, "subscription.tick", "acme", at=(start + timedelta(days=32)).replace(day=1), key="m")
            check()
        recognise(app, start + timedelta(days=70))  # the last period's fee recognised, its credit lapsed
        recognised, breakage, deferred = revenue(app)
        assert deferred == 0 and fee_deferred(app) == 0
        # No included or rolled-over credit is left: only what usage did not spend of the credit notes' credit
        # (what it spent of it is revenue), so the fees less that credit are earned.
        notes_left = sum(g["remaining"] for g in account(app).grant_balances() if g["source"] == "credit_note")
        assert account(app).balance("USD") == notes_left <= credited(app)
        assert recognised + breakage == billed(app) - notes_left
        assert verify_store(app, "acme").ok
    finally:
        app.close()


def billed(app: LedgerApplication) -> int:
    """Fees billed less what the gateway paid back (the account's receivables and the money paid and not refunded:
    no tax and no overage in these tests)."""
    chart = books(app)
    return chart.get(("receivables", "USD"), 0) + chart.get(("gateway_clearing", "USD"), 0)


def pay_and_refund(app: LedgerApplication, invoice: UUID, percent: int, at: datetime) -> None:
    """``invoice`` paid (if not yet) and ``percent`` of its total refunded by the gateway at ``at``."""
    found = app.repository.get(invoice)
    payment = f"pi_{invoice}"
    if found.status == "finalized":
        run(app, "invoice.mark_paid", "acme", at=at, invoice_id=str(invoice), payment=payment)
    amount = (found.total * percent / 100).quantize(Decimal("0.01"))
    refund = PaymentNotification(gateway="stripe", gateway_event_id=f"evt_re_{invoice}", kind="refund_succeeded",
                                 tenant="acme", order_id=str(invoice), invoice_id=str(invoice), amount=amount,
                                 currency="USD", verified_at=at, gateway_reference=f"re_{invoice}",
                                 refunded_payment=payment)
    [result] = app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result


def paid_used_and_refunded(app: LedgerApplication) -> None:
    """Team (30.00, 10.00 included) from Nov 1, its invoice paid that day, 4.00 of the credit used by Nov 6, and the
    invoice refunded in full by the gateway on Nov 10."""
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}"))
    run(app, "invoice.mark_paid", "acme", at=NOV_1, invoice_id=str(invoice.id), payment=f"pi_{invoice.id}")
    debit(app, "4.00", NOV_1, NOV_1 + timedelta(days=5))
    pay_and_refund(app, invoice.id, 100, NOV_1 + timedelta(days=9))


def credited(app: LedgerApplication) -> int:
    """Credit for unused time given (the credit notes' account credit)."""
    return sum(e.amount for e in events(app, "CreditGranted") if e.source == "credit_note")
