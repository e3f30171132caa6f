"""Subscription fees billed in advance are deferred revenue, recognised ratably over the service period they pay
for (IFRS 15 / ASC 606) by the ledger's recognition runs (``money.recognise``, sent by the sweeper); credit
notes, voids and refunds take back what is still deferred from the schedule of the invoice they correct. SQLite
ledger, real commands; the chart of accounts is read from the account's events' postings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.payment_commands import payment_command
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_invoice_books import account, books, events
from tests.unit.subscriptions.test_invoice_overage import run

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_10 = datetime(2026, 11, 10, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"},
              {"code": "odd", "name": "Odd", "currency": "USD", "base_fee": "10.00"},
              {"code": "yearly", "name": "Yearly", "currency": "USD", "cadence": "year", "base_fee": "100.00"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing GmbH", "country": "DE"},
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="revrec-1")
    run(ledger, "account.open", "acme", currency="USD")
    run(ledger, "tax_profile.set", "acme", country="DE")  # 19 % VAT: tax stays payable whatever revenue does
    return ledger


def recognise(app: LedgerApplication, now: datetime) -> None:
    run(app, "money.recognise", "acme", at=now, now=now.isoformat())


def first_invoice(app: LedgerApplication, start: datetime = NOV_1) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{start.isoformat()}"))


def subscribed_and_paid(app: LedgerApplication) -> Invoice:
    """Team from Nov 1, its first invoice paid that day (payment ``pi_1``)."""
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = first_invoice(app)
    run(app, "invoice.mark_paid", "acme", at=NOV_1, invoice_id=str(invoice.id), payment="pi_1")
    return invoice


def revenue(app: LedgerApplication) -> tuple[int, int]:
    """(recognised, deferred) revenue of the account's books, as positive sub-units (they are credits)."""
    chart = books(app)
    return -chart.get(("recognised_revenue", "USD"), 0), -chart.get(("deferred_revenue", "USD"), 0)


def test_a_monthly_fee_is_deferred_when_billed_half_recognised_mid_period_and_all_at_its_end(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    assert books(app) == {("receivables", "USD"): 3570 * CENT, ("deferred_revenue", "USD"): -3000 * CENT,
                          ("tax_payable", "USD"): -570 * CENT}
    recognise(app, NOV_16)  # 15 of 30 days
    assert revenue(app) == (1500 * CENT, 1500 * CENT)
    # A day's share each, dated in its day (Nov 1's on Nov 1 23:59:59.999999), though one run recorded them.
    assert [e.at for e in events(app, "FeeRevenueRecognised")] == [
        NOV_1 + timedelta(days=d + 1, microseconds=-1) for d in range(15)]
    recognise(app, NOV_16)  # the same run again (a redelivery, another process): nothing more
    assert len(events(app, "FeeRevenueRecognised")) == 15
    recognise(app, DEC_1)
    assert revenue(app) == (3000 * CENT, 0)
    assert account(app).fee_schedule(str(first_invoice(app).id)) is None and account(app).deferred_fees("USD") == 0
    recognise(app, DEC_1 + timedelta(days=3))  # nothing left: never recognised twice
    assert len(events(app, "FeeRevenueRecognised")) == 30 and revenue(app) == (3000 * CENT, 0)
    assert books(app)[("tax_payable", "USD")] == -570 * CENT
    assert verify_store(app, "acme").ok


def test_ten_dollars_over_31_days_recognised_daily_sums_to_exactly_the_fee(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", at=DEC_1, key="m", plan="odd")  # Dec 1 - Jan 1: 10.00
    recognised = []
    for day in range(1, 31):
        now = DEC_1 + timedelta(days=day, hours=7, minutes=13, seconds=17)
        recognise(app, now)
        done, deferred = revenue(app)
        assert done + deferred == 1000 * CENT and deferred > 0
        # Rounded down, never ahead of the time elapsed (by more than a sub-unit per run).
        assert done <= 1000 * CENT * (now - DEC_1).total_seconds() / (31 * 86400) + day
        recognised.append(done)
    assert recognised == sorted(recognised)
    recognise(app, JAN_1)
    assert revenue(app) == (1000 * CENT, 0)  # exactly the fee, not a sub-unit more or less
    assert verify_store(app, "acme").ok


def test_a_yearly_fee_recognised_month_by_month_sums_to_exactly_the_fee(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="yearly")  # Nov 1 2026 - Nov 1 2027: 100.00
    assert revenue(app) == (0, 10000 * CENT)  # not the whole year on day one
    month = NOV_1
    for _ in range(12):
        month = (month + timedelta(days=32)).replace(day=1)
        recognise(app, month)
    done, deferred = revenue(app)
    assert (done, deferred) == (10000 * CENT, 0)
    assert verify_store(app, "acme").ok


def test_a_cancel_mid_period_gives_back_the_deferred_rest_and_keeps_the_recognised_part(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    recognise(app, NOV_10)
    assert revenue(app) == (900 * CENT, 2100 * CENT)  # 9 of 30 days
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel"))
    assert note.total == Decimal("-17.85")  # 15.00 of unused time and its 2.85 of VAT
    # The credit leaves deferred revenue; Nov 10-16 (not recognised by a run yet) is recognised at the cancel: the
    # period earned exactly its fee less the credit, and nothing is left deferred.
    assert revenue(app) == (1500 * CENT, 0)
    assert books(app) == {("receivables", "USD"): 3570 * CENT, ("tenant_wallet", "USD"): -1785 * CENT,
                          ("recognised_revenue", "USD"): -1500 * CENT, ("tax_payable", "USD"): -285 * CENT}
    recognise(app, DEC_1)
    # Nothing after the cancel: the last share is Nov 9's (recognised by the run of Nov 10).
    assert events(app, "FeeRevenueRecognised")[-1].at == NOV_10 - timedelta(microseconds=1)
    assert verify_store(app, "acme").ok


def test_an_upgrade_mid_period_recognises_the_old_fee_to_the_change_and_defers_the_new_one(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 for November
    run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)  # -15.00 unused, +45.00 rest
    assert revenue(app) == (1500 * CENT, 4500 * CENT)  # Nov 1-16 of the old fee; Nov 16 - Dec 1 of the new one
    recognise(app, NOV_16 + timedelta(days=5, minutes=1))  # the first sweep of Nov 21: a third of the rest
    assert revenue(app) == ((1500 + 1500) * CENT, 3000 * CENT)
    recognise(app, DEC_1)
    assert revenue(app) == (6000 * CENT, 0)  # everything billed (30.00 + 30.00 net), once
    assert books(app)[("receivables", "USD")] == (3570 + 3570) * CENT
    assert verify_store(app, "acme").ok


def test_voiding_an_unpaid_invoice_reverses_both_its_recognised_and_its_deferred_fee(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    recognise(app, NOV_10)
    runs = len(events(app, "FeeRevenueRecognised"))
    run(app, "invoice.void", "acme", at=NOV_16, invoice_id=str(first_invoice(app).id), reason="goodwill")
    assert books(app) == {}  # the 9.00 recognised and the 21.00 deferred both reversed
    assert account(app).deferred_fees("USD") == 0
    recognise(app, DEC_1)
    assert len(events(app, "FeeRevenueRecognised")) == runs and books(app) == {}
    assert verify_store(app, "acme").ok


def test_a_refund_of_a_paid_invoice_takes_its_deferred_fee_and_then_recognised_revenue(
        app: LedgerApplication) -> None:
    invoice = subscribed_and_paid(app)
    recognise(app, NOV_10)
    runs = len(events(app, "FeeRevenueRecognised"))
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt_re", kind="refund_succeeded", tenant="acme",
                                 order_id=str(invoice.id), invoice_id=str(invoice.id), amount=Decimal("35.70"),
                                 currency="USD", verified_at=NOV_16, gateway_reference="re_1",
                                 refunded_payment="pi_1")
    [result] = app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result
    assert books(app) == {}  # every cent back: 21.00 from deferred, the 9.00 recognised reversed, the VAT
    recognise(app, DEC_1)
    assert len(events(app, "FeeRevenueRecognised")) == runs and books(app) == {}
    assert verify_store(app, "acme").ok


def test_the_sweeper_recognises_once_a_day_and_at_the_period_end_and_a_replay_rebuilds_the_same(
        app: LedgerApplication, tmp_path: Path) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    sweeper = Sweeper(app)
    assert sweeper.sweep(NOV_1 + timedelta(hours=5)) == 0  # the first UTC day of the period: nothing yet
    assert sweeper.sweep(datetime(2026, 11, 2, 0, 1, tzinfo=UTC)) == 1
    assert sweeper.sweep(datetime(2026, 11, 2, 6, 0, tzinfo=UTC)) == 0  # once a day
    assert sweeper.sweep(DEC_1) == 1  # the period ended: the rest at once
    assert revenue(app) == (3000 * CENT, 0)
    assert sweeper.sweep(DEC_1 + timedelta(days=1)) == 0
    before = account(app)
    again = LedgerApplication(persistence_env(None, str(tmp_path)))  # replayed from the stored events
    try:
        replayed = again.repository.get(ids.account_id("acme"))
        assert vars(replayed) == vars(before)
    finally:
        again.close()
    assert verify_store(app, "acme").ok


def test_a_fee_paid_before_access_is_recognised_from_the_payment_not_from_the_order(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", trial=False, collection="charge_before_access")
    invoice = first_invoice(app)
    recognise(app, NOV_10)  # incomplete: no service yet, nothing earned
    assert revenue(app) == (0, 3000 * CENT)
    paid_at = datetime(2026, 11, 4, 12, tzinfo=UTC)
    run(app, "invoice.mark_paid", "acme", at=paid_at, invoice_id=str(invoice.id), payment="pi_1")
    schedule = account(app).fee_schedule(str(invoice.id))
    assert schedule is not None and (schedule["start"], schedule["end"]) == (paid_at, paid_at + timedelta(days=30))
    recognise(app, paid_at + timedelta(days=15))  # Nov 4 12:00 - Nov 19 00:00, the whole UTC days: 14.5 of 30
    assert revenue(app) == (1450 * CENT, 1550 * CENT)
    recognise(app, paid_at + timedelta(days=30))
    assert revenue(app) == (3000 * CENT, 0)
    assert verify_store(app, "acme").ok


def usage_lines(app: LedgerApplication, start: datetime, at: datetime) -> Invoice:
    """Rating's usage lines of the period before ``start`` (none): they finalize the renewal draft of ``start``."""
    key = f"{subscription_id('acme', 'm')}/{start.isoformat()}"
    ended = (start - timedelta(days=1)).replace(day=1)
    run(app, "invoice.usage_lines", "acme", at=at, invoice_key=key, lines=[], period_start=ended.isoformat(),
        period_end=start.isoformat())
    invoice: Invoice = app.repository.get(invoice_id("acme", key))
    return invoice


def replays_and_snapshots_the_same(app: LedgerApplication, tmp_path: Path) -> None:
    before = account(app)
    assert app.snapshotter is not None
    back = app.snapshotter._from_stored(app.snapshotter.encode(before))
    assert back is not None and vars(back) == vars(before)
    again = LedgerApplication(persistence_env(None, str(tmp_path)))  # replayed from the stored events
    try:
        assert vars(again.repository.get(ids.account_id("acme"))) == vars(before)
    finally:
        again.close()


def test_a_cancel_while_the_renewal_is_a_draft_takes_its_credit_from_the_renewal_not_from_earlier_revenue(
        app: LedgerApplication, tmp_path: Path) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    recognise(app, DEC_1)
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")  # the renewal draft: 30.00 for December
    cancel_at = DEC_1 + timedelta(days=10)
    run(app, "subscription.cancel", "acme", at=cancel_at, key="m", immediately=True)  # 21 of 31 days unused: 20.32
    assert revenue(app) == (3000 * CENT, -2032 * CENT)  # November's revenue stays; December's credit waits for it
    draft = first_invoice(app, DEC_1)
    assert draft.status == "draft"
    assert account(app).pending_fee_credit(str(draft.id)) == {"unit": "USD", "amount": 2032 * CENT,
                                                               "end": cancel_at}
    replays_and_snapshots_the_same(app, tmp_path)
    usage_lines(app, DEC_1, cancel_at + timedelta(hours=1))
    # December earned its fee less the credit (Dec 1-11), recognised at billing: nothing stays deferred past the
    # cancel, and later runs recognise nothing more.
    assert revenue(app) == ((3000 + 968) * CENT, 0)
    assert account(app).fee_schedule(str(draft.id)) is None and account(app).pending_fee_credit(str(draft.id)) is None
    recognise(app, JAN_1)
    assert revenue(app) == ((3000 + 968) * CENT, 0)
    replays_and_snapshots_the_same(app, tmp_path)
    assert verify_store(app, "acme").ok


def test_a_cancel_after_the_period_end_before_the_tick_keeps_the_ended_periods_revenue(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    recognise(app, DEC_1)
    run(app, "subscription.cancel", "acme", at=DEC_1 + timedelta(days=3), key="m", immediately=True)  # renews first
    assert revenue(app)[0] == 3000 * CENT  # was 2.90: the credit of December came out of November's revenue
    usage_lines(app, DEC_1, DEC_1 + timedelta(days=3, minutes=5))
    assert revenue(app) == ((3000 + 290) * CENT, 0)  # Dec 1-4 of 30.00 (27.10 credited); nothing deferred to Jan 1
    recognise(app, JAN_1)
    assert revenue(app) == ((3000 + 290) * CENT, 0)
    assert verify_store(app, "acme").ok


def test_an_upgrade_while_the_renewal_is_a_draft_ends_the_old_plans_share_at_the_change(
        app: LedgerApplication, tmp_path: Path) -> None:
    app_catalog = {**CATALOG, "plans": [*CATALOG["plans"], {"code": "pro", "name": "Pro", "currency": "USD",
                                                             "base_fee": "90.00"}]}
    run(app, "catalog.publish", None, document=app_catalog, digest="revrec-2")
    run(app, "subscription.create", "acme", key="m", plan="team")
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")
    recognise(app, DEC_1 + timedelta(hours=1))
    change_at = DEC_1 + timedelta(hours=2)
    run(app, "subscription.change", "acme", at=change_at, key="m", plan="pro")  # -29.92 unused, +89.76 rest
    assert revenue(app) == (3000 * CENT, (8976 - 2992) * CENT)  # November's 30.00 untouched (was 0.08)
    replays_and_snapshots_the_same(app, tmp_path)
    renewal = usage_lines(app, DEC_1, DEC_1 + timedelta(hours=3))
    assert account(app).fee_schedule(str(renewal.id)) is None  # the old plan's 2 hours (0.08) recognised at billing
    assert revenue(app) == ((3000 + 8) * CENT, 8976 * CENT)  # only the new plan's rest deferred (was 119.76)
    recognise(app, JAN_1)
    assert revenue(app) == ((3000 + 8 + 8976) * CENT, 0)  # December: exactly its service, 89.84
    assert verify_store(app, "acme").ok


def gateway_refund(app: LedgerApplication, invoice: Invoice, amount: str, at: datetime, reference: str) -> None:
    refund = PaymentNotification(gateway="stripe", gateway_event_id=f"evt_{reference}", kind="refund_succeeded",
                                 tenant="acme", order_id=str(invoice.id), invoice_id=str(invoice.id),
                                 amount=Decimal(amount), currency="USD", verified_at=at,
                                 gateway_reference=reference, refunded_payment="pi_1")
    [result] = app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result


def test_a_cancel_after_a_full_refund_credits_nothing_more(app: LedgerApplication) -> None:
    invoice = subscribed_and_paid(app)
    gateway_refund(app, invoice, "35.70", NOV_10 + timedelta(days=3), "re_1")  # every cent back in cash
    result = run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    assert result.value["lines"] == []  # was a 17.85 credit note on top of the 35.70 refunded
    assert books(app) == {}  # no wallet credit, no revenue or tax below zero
    assert verify_store(app, "acme").ok


def test_a_full_refund_after_a_cancel_takes_the_credit_already_given_back_from_the_wallet(
        app: LedgerApplication) -> None:
    invoice = subscribed_and_paid(app)
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)  # 17.85 of account credit
    assert account(app).available("USD") == 1785 * CENT
    gateway_refund(app, invoice, "35.70", NOV_16 + timedelta(days=1), "re_1")
    # The customer has 35.70 back in cash and nothing more: the unspent credit for unused time is taken back.
    assert books(app) == {}
    assert account(app).available("USD") == 0
    note = app.repository.get(invoice_id("acme", f"invoices/{invoice.id}/refunds/stripe/re_1"))
    assert note.total == Decimal("-35.70")
    assert [(x["kind"], x["amount"], bool(x.get("reclaimed"))) for x in note.lines] == [
        ("adjustment", "-15.00", False), ("tax", "-2.85", False), ("adjustment", "-17.85", True)]
    assert app.repository.get(invoice.id).given_back == Decimal("35.70")
    assert verify_store(app, "acme").ok


def test_a_full_refund_of_an_invoice_an_upgrade_credited_leaves_that_credit_owed(app: LedgerApplication) -> None:
    invoice = subscribed_and_paid(app)
    run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)  # -15.00 of team, +45.00: 35.70 owed
    gateway_refund(app, invoice, "35.70", NOV_16 + timedelta(days=1), "re_1")
    recognise(app, DEC_1)
    # The first half of November's team seat was refunded; the upgrade's 17.85 credit of it is owed again: the
    # customer owes 35.70 + 17.85, revenue is the new seats' 45.00 rest (was 30.00: the credit given back twice).
    assert books(app) == {("receivables", "USD"): 5355 * CENT, ("recognised_revenue", "USD"): -4500 * CENT,
                          ("tax_payable", "USD"): -855 * CENT}
    assert verify_store(app, "acme").ok


def test_voiding_an_upgrades_invoice_keeps_the_rest_of_the_periods_fee_deferred_until_the_service_is_given(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 for November
    changed = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)  # -15.00 unused, +45.00 rest
    upgrade = invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{changed.command_id}")
    run(app, "invoice.void", "acme", at=NOV_16 + timedelta(days=1), invoice_id=str(upgrade))
    # The upgrade's 30.00 net is reversed; the first invoice's 30.00 is owed in full again, Nov 16 - Dec 1 of it
    # (15.00) for service still to come: deferred, not all recognised at the void (it was (30.00, 0) here).
    assert revenue(app) == (1500 * CENT, 1500 * CENT)
    assert account(app).fee_schedule(str(first_invoice(app).id)) is not None
    recognise(app, NOV_16 + timedelta(days=5, minutes=1))  # the first sweep of Nov 21: a third of the rest
    assert revenue(app) == (2000 * CENT, 1000 * CENT)
    recognise(app, DEC_1)
    assert revenue(app) == (3000 * CENT, 0)  # the same total as before, November's fee, once
    assert books(app)[("receivables", "USD")] == 3570 * CENT
    assert verify_store(app, "acme").ok


def test_a_cancel_after_an_upgrades_invoice_was_voided_credits_the_rest_from_what_is_still_deferred(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    changed = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)
    upgrade = invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{changed.command_id}")
    run(app, "invoice.void", "acme", at=NOV_16 + timedelta(days=1), invoice_id=str(upgrade))
    recognise(app, NOV_16 + timedelta(days=4))  # Nov 16-20 of the first invoice's rest: 4.00
    assert revenue(app) == (1900 * CENT, 1100 * CENT)
    run(app, "subscription.cancel", "acme", at=NOV_16 + timedelta(days=5), key="m", immediately=True)
    # The cancel credits Nov 21 - Dec 1 (10.00) from what is deferred; Nov 20-21 is recognised at the cancel.
    assert revenue(app) == (2000 * CENT, 0)
    recognise(app, DEC_1)
    assert revenue(app) == (2000 * CENT, 0)
    assert verify_store(app, "acme").ok
