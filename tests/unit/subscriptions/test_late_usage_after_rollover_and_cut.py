"""Usage of a period draws that period's plan credit whatever the order it reaches the ledger in, also when the
credit rolls over (its renewal carries part of it into the next period's grant) and when an immediate cancel or a
plan or quantity change cuts the period short (docs/subscriptions.md "Recurring credits", docs/ledger.md "Included
credit", *Credit kept for late usage*). Rating sends the close debit of a meter priced at close (max, last,
unique_count) only after the renewal's ``PeriodEnded`` or the cancel's ``Canceled``, and usage of a period's last
moments can come after its end (Kafka and rating lag). Before session 14 the renewal voided a rollover credit at
once (carry into the next grant, the rest to breakage) and a cancel or change voided the credit at the cut, so that
usage found the credit closed and was billed as overage, and the carry was what was left before it. SQLite ledger,
real commands; the chart of accounts is read from the account's events' postings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.limits import RECURRING_CREDIT_LATE_USAGE_DAYS
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_fee_revenue_recognition import replays_and_snapshots_the_same
from tests.unit.subscriptions.test_included_credit_revenue import recognise, revenue
from tests.unit.subscriptions.test_invoice_books import account, books, events
from tests.unit.subscriptions.test_invoice_overage import debit, run, usage_line

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_10 = datetime(2026, 11, 10, tzinfo=UTC)
NOV_12 = datetime(2026, 11, 12, tzinfo=UTC)
NOV_15 = datetime(2026, 11, 15, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC)
NOV_25 = datetime(2026, 11, 25, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
DEC_10 = datetime(2026, 12, 10, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
LAPSES = timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
# 50.00 a month including 10.00 USD of credit; calls priced in real time, seats (the last reading) priced at close.
# ``rollover`` (capped at 2.00) or not; ``lite`` has no credit (a downgrade to it carries nothing).
METERS = [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.20"}},
          {"code": "seats", "aggregation": "last", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "5.00"}}]
CHARGES = [{"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
           {"meter": "seats", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "3.00"}}]


def catalog(rollover: bool) -> dict[str, Any]:
    credit: dict[str, Any] = {"unit": "USD", "amount": "10.00"}
    if rollover:
        credit.update(rollover=True, rollover_cap="2.00")
    return {"meters": METERS, "plans": [
        {"code": "hybrid", "name": "Hybrid", "currency": "USD", "base_fee": "50.00", "charges": CHARGES,
         "recurring_credits": [credit]},
        {"code": "lite", "name": "Lite", "currency": "USD", "base_fee": "10.00", "charges": CHARGES}]}


def subscribed(path: Path, rollover: bool = True) -> LedgerApplication:
    app = LedgerApplication(persistence_env(None, str(path)))
    run(app, "catalog.publish", None, document=catalog(rollover), digest=f"late-{rollover}")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="hybrid")  # Nov 1 - Dec 1, 10.00 of credit
    return app


def close_debit(app: LedgerApplication, amount: str, period: datetime, last_reading_at: datetime) -> None:
    """The ``usage.debit`` rating's close sends for a ``last`` meter: at its last reading, after the period ended."""
    run(app, "usage.debit", "acme", at=last_reading_at, unit="USD", amount_subunits=int(Decimal(amount) * U),
        meter="seats", overage_policy="overage",
        cause={"period": period.isoformat(), "aggregation": "last", "quantity": "1", "closed": True,
               "event_ids": [str(uuid4())]})


def tick(app: LedgerApplication, at: datetime) -> None:
    run(app, "subscription.tick", "acme", at=at, key="m")


def usage_lines(app: LedgerApplication, key_end: datetime, start: datetime, end: datetime, calls: str, seats: str,
                at: datetime) -> Invoice:
    """Rating's usage lines of [start, end) (after its close debits) on the draft named by ``key_end``."""
    key = f"{subscription_id('acme', 'm')}/{key_end.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=at, invoice_key=key, period_start=start.isoformat(),
        period_end=end.isoformat(), lines=[usage_line(calls), usage_line(seats, meter="seats")])
    return app.repository.get(invoice_id("acme", key))  # type: ignore[no-any-return]


def lines(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


def outcome(app: LedgerApplication, invoices: list[Invoice]) -> dict[str, Any]:
    """What the customer and the books see: the invoices, the chart of accounts, the credit left in each grant, what
    is owed. (A grant's ``amount`` is as granted: a carry taken at once shows whole in the next grant, and late usage
    of the period before draws it from there: the same money.)"""
    assert verify_store(app, "acme").ok
    return {"invoices": [(lines(i), i.total) for i in invoices], "books": books(app), "revenue": revenue(app),
            "overage": account(app).overage_receivable("USD"), "receivable": account(app).receivable("USD"),
            "grants": [(g["status"], g["remaining"]) for g in account(app).grant_balances()],
            "available": account(app).available("USD"), "reserve": account(app).late_usage_reserve("USD"),
            "lapsed": sorted(e.remainder for e in events(app, "GrantExpired"))}


# -- a rollover credit and its renewal ---------------------------------------------------------------------------
# November's calls (real time, Nov 20) and seats (the close debit at the last reading, Nov 25) relative to the Dec 1
# renewal, December's usage (Dec 10) and the sweeper; rating's usage lines of November finalize the Dec 1 invoice.
Steps = Callable[[LedgerApplication, str, str], None]


def _before_the_renewal(app: LedgerApplication, calls: str, seats: str) -> None:
    debit(app, calls, NOV_1, NOV_20)
    close_debit(app, seats, NOV_1, NOV_25)
    tick(app, DEC_1)
    debit(app, "7.00", DEC_1, DEC_10)


def _close_debit_after_the_renewal(app: LedgerApplication, calls: str, seats: str) -> None:
    """As it always happens: rating closes November on the renewal's ``PeriodEnded``."""
    debit(app, calls, NOV_1, NOV_20)
    tick(app, DEC_1)
    close_debit(app, seats, NOV_1, NOV_25)
    debit(app, "7.00", DEC_1, DEC_10)


def _all_after_the_renewal_the_sweep_and_december(app: LedgerApplication, calls: str, seats: str) -> None:
    tick(app, DEC_1)
    Sweeper(app).sweep(DEC_1 + timedelta(seconds=5))
    debit(app, "7.00", DEC_1, DEC_10)
    debit(app, calls, NOV_1, NOV_20)
    close_debit(app, seats, NOV_1, NOV_25)


def _tick_days_late(app: LedgerApplication, calls: str, seats: str) -> None:
    """The ledger was down: the sweeper's first round, then the calls, the tick three days after the end, the seats."""
    Sweeper(app).sweep(DEC_1 + timedelta(days=3))
    debit(app, calls, NOV_1, NOV_20)
    tick(app, DEC_1 + timedelta(days=3, seconds=30))
    close_debit(app, seats, NOV_1, NOV_25)
    debit(app, "7.00", DEC_1, DEC_10)


ORDERS: dict[str, Steps] = {
    "before_the_renewal": _before_the_renewal,
    "close_debit_after_the_renewal": _close_debit_after_the_renewal,
    "all_after_the_renewal_the_sweep_and_december": _all_after_the_renewal_the_sweep_and_december,
    "tick_days_late": _tick_days_late,
}


def _rollover_november(path: Path, order: str, calls: str, seats: str) -> dict[str, Any]:
    app = subscribed(path)
    ORDERS[order](app, calls, seats)
    december = usage_lines(app, DEC_1, NOV_1, DEC_1, calls, seats, DEC_1 + timedelta(hours=1))
    Sweeper(app).sweep(DEC_1 + LAPSES + timedelta(hours=1))  # November's late usage window is over
    tick(app, JAN_1)
    january = usage_lines(app, JAN_1, DEC_1, JAN_1, "7.00", "0.00", JAN_1 + timedelta(hours=1))
    recognise(app, JAN_1 + timedelta(hours=2))
    found = outcome(app, [december, january])
    app.close()
    return found


@pytest.mark.parametrize(("calls", "seats", "carried"), [("4.00", "3.00", "2.00"), ("5.00", "4.50", "0.50")],
                         ids=["within_the_rest", "into_the_carry"])
def test_a_rollover_credit_pays_its_periods_usage_the_same_whenever_it_reaches_the_ledger(
        tmp_path: Path, calls: str, seats: str, carried: str) -> None:
    outcomes = {order: _rollover_november(tmp_path / order, order, calls, seats) for order in ORDERS}
    on_time = outcomes["before_the_renewal"]
    for order, found in outcomes.items():
        assert found == on_time, order
    used = Decimal(calls) + Decimal(seats)
    # November's usage all paid by November's credit, nothing owed as overage; what it left is carried (capped).
    assert on_time["invoices"][0] == ([("base_fee", "50.00"), ("usage", calls), ("usage", seats),
                                       ("credits_applied", f"-{used:.2f}")], Decimal("50.00"))
    assert on_time["overage"] == 0
    december = 1000 * CENT + int(Decimal(carried) * 100) * CENT
    # December's grant: 7.00 used, 2.00 of its rest carried into January's, the rest kept for December's late usage.
    assert on_time["grants"][1] == ("open", december - 700 * CENT - 200 * CENT)
    # November's rest above the cap lapsed once, after its late usage window.
    assert on_time["lapsed"] == [1000 * CENT - int(used * 100) * CENT - int(Decimal(carried) * 100) * CENT]


def test_the_reviewers_close_debit_after_the_renewal_draws_the_rollover_credit_not_overage(tmp_path: Path) -> None:
    """The defect as reported: 4.00 of calls in November, the renewal carries 2.00 of the 6.00 left and lapsed 4.00,
    then the seats' close debit of 3.00 came and was billed as overage (57.00 instead of 50.00 + 7.00 - 7.00)."""
    app = subscribed(tmp_path)
    _close_debit_after_the_renewal(app, "4.00", "3.00")
    assert account(app).overage_receivable("USD") == 0
    # November's credit: 2.00 carried into December's 12.00, its 4.00 above the cap kept for November's late usage
    # (set aside: not available to December's usage), of which the seats took 3.00.
    assert account(app).late_usage_reserve("USD") == 100 * CENT
    assert account(app).available("USD") == 1200 * CENT - 700 * CENT
    december = usage_lines(app, DEC_1, NOV_1, DEC_1, "4.00", "3.00", DEC_1 + timedelta(hours=1))
    assert lines(december) == [("base_fee", "50.00"), ("usage", "4.00"), ("usage", "3.00"),
                               ("credits_applied", "-7.00")]
    app.close()


def test_late_usage_beyond_the_rest_draws_the_carry_from_the_next_grant_and_owes_only_what_is_not_there(
        tmp_path: Path) -> None:
    """December's usage spent its grant (the carry in it too) before November's close debit came: the carry it had
    is gone, so only what is left of it pays; the rest is owed, as on time it would have been owed by December."""
    app = subscribed(tmp_path)
    debit(app, "5.00", NOV_1, NOV_20)  # 5.00 left: 2.00 carried into December's 12.00, 3.00 kept
    tick(app, DEC_1)
    debit(app, "11.50", DEC_1, DEC_10)  # 0.50 of December's grant left
    close_debit(app, "4.50", NOV_1, NOV_25)  # 3.00 kept + 0.50 of the carry still there; 1.00 owed
    assert account(app).overage_receivable("USD") == 100 * CENT
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [("open", 0), ("open", 0)]
    # On time the seats would have left 0.50 to carry: December's 10.50 and 1.00 of its usage owed. The same money.
    on_time = subscribed(tmp_path / "on_time")
    debit(on_time, "5.00", NOV_1, NOV_20)
    close_debit(on_time, "4.50", NOV_1, NOV_25)
    tick(on_time, DEC_1)
    debit(on_time, "11.50", DEC_1, DEC_10)
    assert account(on_time).overage_receivable("USD") == 100 * CENT
    assert revenue(on_time) == revenue(app)
    on_time.close()
    app.close()


def test_after_its_window_the_rest_has_lapsed_and_late_usage_draws_no_carry(tmp_path: Path) -> None:
    app = subscribed(tmp_path)
    debit(app, "4.00", NOV_1, NOV_20)
    tick(app, DEC_1)
    Sweeper(app).sweep(DEC_1 + LAPSES)
    assert [e.remainder for e in events(app, "GrantExpired")] == [400 * CENT]
    close_debit(app, "3.00", NOV_1, NOV_25)  # later than ingest accepts anyway: owed, December's grant untouched
    assert account(app).overage_receivable("USD") == 300 * CENT
    assert account(app).grant_balances()[-1]["remaining"] == 1200 * CENT
    Sweeper(app).sweep(DEC_1 + LAPSES + timedelta(hours=1))
    assert len(events(app, "GrantExpired")) == 1
    assert verify_store(app, "acme").ok
    app.close()


@pytest.mark.parametrize("ending", ["cancel_at_period_end", "pause"])
def test_a_period_that_ends_without_a_renewal_credit_leaves_its_rollover_credit_open_for_its_usage(
        tmp_path: Path, ending: str) -> None:
    """A cancel at the period's end or a paused renewal carries nothing: the rollover credit's rest used to lapse at
    once, and the close debit after it was owed. It now pays that debit; the rest lapses after the window."""
    app = subscribed(tmp_path)
    debit(app, "4.00", NOV_1, NOV_20)
    if ending == "pause":
        run(app, "subscription.pause", "acme", at=NOV_25, key="m")
    else:
        run(app, "subscription.cancel", "acme", at=NOV_25, key="m", immediately=False)
    tick(app, DEC_1)
    close_debit(app, "3.00", NOV_1, NOV_25)
    assert account(app).overage_receivable("USD") == 0
    assert account(app).spendable("USD", "seats", DEC_1) == 0  # not drawn by usage after the period
    Sweeper(app).sweep(DEC_1 + LAPSES)
    assert [e.remainder for e in events(app, "GrantExpired")] == [300 * CENT]
    assert account(app).balance("USD") == 0
    assert verify_store(app, "acme").ok
    app.close()


# -- an immediate cancel or a change cuts the period ---------------------------------------------------------------


def _cut(app: LedgerApplication, how: str) -> None:
    if how == "cancel":
        run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    elif how == "upgrade":
        run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)
    else:
        run(app, "subscription.change", "acme", at=NOV_16, key="m", plan="lite")


def _cut_period(path: Path, how: str, rollover: bool, late: bool) -> dict[str, Any]:
    """4.00 of calls on Nov 10, the cut on Nov 16, 1.00 of calls of Nov 12 and the seats' close debit of 3.00 (last
    reading Nov 15) before the cut or (``late``) after it, as rating sends the close of [Nov 1, Nov 16) on the cut."""
    app = subscribed(path, rollover)
    debit(app, "4.00", NOV_1, NOV_10)
    if not late:
        debit(app, "1.00", NOV_1, NOV_12)
        close_debit(app, "3.00", NOV_1, NOV_15)
    _cut(app, how)
    if late:
        debit(app, "1.00", NOV_1, NOV_12)
        close_debit(app, "3.00", NOV_1, NOV_15)
    invoices = []
    if how == "cancel":  # the final draft of [Nov 1, Nov 16): rating's usage lines finalize it
        invoices.append(usage_lines(app, NOV_16, NOV_1, NOV_16, "5.00", "3.00", NOV_16 + timedelta(hours=1)))
    recognise(app, NOV_16 + LAPSES + timedelta(hours=1))  # the late usage window of the cut is over
    found = outcome(app, invoices)
    replays_and_snapshots_the_same(app, path)
    app.close()
    return found


@pytest.mark.parametrize("rollover", [False, True], ids=["no_rollover", "rollover"])
@pytest.mark.parametrize("how", ["cancel", "upgrade", "downgrade_to_no_credit"])
def test_usage_from_before_a_cut_draws_the_credit_it_was_entitled_to_whenever_it_reaches_the_ledger(
        tmp_path: Path, how: str, rollover: bool) -> None:
    on_time = _cut_period(tmp_path / "on_time", how, rollover, late=False)
    late = _cut_period(tmp_path / "late", how, rollover, late=True)
    assert late == on_time
    assert on_time["overage"] == 0  # 8.00 of usage before the cut, within the 10.00 of credit
    if how == "cancel":
        # The final invoice of [Nov 1, Nov 16): the usage, all paid with credit. Before, the late 4.00 was overage.
        assert on_time["invoices"] == [([("usage", "5.00"), ("usage", "3.00"), ("credits_applied", "-8.00")],
                                        Decimal(0))]
        assert on_time["lapsed"] == [200 * CENT]  # the credit left at the cut, once the window is over
    assert on_time["revenue"][2] == 0  # nothing deferred


def test_the_reviewers_close_debit_after_an_immediate_cancel_draws_the_credit_not_overage(tmp_path: Path) -> None:
    app = subscribed(tmp_path, rollover=False)
    debit(app, "4.00", NOV_1, NOV_10)
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    # The 6.00 left stays for the usage of before the cancel, set aside (the credit note's 25.00 is what is available).
    assert (account(app).late_usage_reserve("USD"), account(app).available("USD")) == (600 * CENT, 2500 * CENT)
    assert account(app).spendable("USD", "seats", NOV_16) == 2500 * CENT  # after the cut: the credit note only
    close_debit(app, "3.00", NOV_1, NOV_15)
    assert account(app).overage_receivable("USD") == 0
    assert (account(app).late_usage_reserve("USD"), account(app).available("USD")) == (300 * CENT, 2500 * CENT)
    app.close()


def test_usage_from_before_a_change_draws_the_new_grant_up_to_what_the_old_one_had(tmp_path: Path) -> None:
    """An upgrade to 3 on Nov 16: the old grant's 6.00 goes into the new one (15.00 for the rest of the period and
    1.00 beyond the old allotment's 5.00 for it: 16.00); late usage of before the change draws it from there, at
    most the 6.00 the old grant had, as on time it would have been taken off the carry."""
    app = subscribed(tmp_path, rollover=False)
    debit(app, "4.00", NOV_1, NOV_10)
    run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)
    assert account(app).spendable("USD", "seats", NOV_15) == 600 * CENT
    close_debit(app, "7.00", NOV_1, NOV_15)
    assert account(app).overage_receivable("USD") == 100 * CENT
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("open", 0), ("open", 1000 * CENT)]
    Sweeper(app).sweep(NOV_16 + LAPSES)  # the old grant closes, with nothing left
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("expired", 0), ("open", 1000 * CENT)]
    assert verify_store(app, "acme").ok
    app.close()


def test_a_give_back_of_late_usage_that_drew_the_carry_restores_it(tmp_path: Path) -> None:
    """A correction of November usage that drew the carry in December's grant gives it back there (and to the carry),
    so the customer ends with the credit as if neither had come."""
    app = subscribed(tmp_path)
    debit(app, "9.00", NOV_1, NOV_20)  # 1.00 left: all of it carried into December's 11.00
    tick(app, DEC_1)
    close_debit(app, "0.50", NOV_1, NOV_25)  # drawn from the carry
    assert account(app).available("USD") == 1050 * CENT
    debit(app, "-0.50", NOV_1, NOV_25)
    assert account(app).available("USD") == 1100 * CENT
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [("open", 0), ("open", 1100 * CENT)]
    close_debit(app, "1.20", NOV_1, NOV_25)  # the carry is whole again: 1.00 of it, 0.20 owed
    assert (account(app).available("USD"), account(app).overage_receivable("USD")) == (1000 * CENT, 20 * CENT)
    assert verify_store(app, "acme").ok
    app.close()
