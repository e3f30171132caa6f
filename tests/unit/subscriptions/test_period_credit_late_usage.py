"""A plan's recurring credit without rollover is drawn by the usage of its own period whenever that usage reaches the
ledger: before or after the period's end, the renewal's tick or the expiry sweep, within
``RECURRING_CREDIT_LATE_USAGE_DAYS`` of the period's end; the sweep lapses what is left of it after that, once
(docs/subscriptions.md "Recurring credits"). Rating sends the close debit of a meter priced at close (max, last,
unique_count) only after the renewal's ``PeriodEnded``, and usage of the period's last moments can come after the
period's end (Kafka and rating lag); before session 13 the renewal or the sweep expired the credit at the period's
end first, that usage was billed in full and the credit left went to breakage. SQLite ledger, real commands; the
chart of accounts is read from the account's events' postings."""

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

from tests.unit.subscriptions.test_included_credit_revenue import recognise, revenue
from tests.unit.subscriptions.test_invoice_books import account, books, events
from tests.unit.subscriptions.test_invoice_overage import debit, run, usage_line

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC)
NOV_25 = datetime(2026, 11, 25, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
LAPSES = timedelta(days=RECURRING_CREDIT_LATE_USAGE_DAYS)
# The reviewer's hybrid plan: 50.00 a month including 10.00 USD of credit, calls priced in real time, seats (the last
# reading) priced at close.
HYBRID: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.20"}},
               {"code": "seats", "aggregation": "last",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "5.00"}}],
    "plans": [{"code": "hybrid", "name": "Hybrid", "currency": "USD", "base_fee": "50.00",
               "charges": [{"meter": "api_calls", "included": "100",
                            "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
                           {"meter": "seats", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "3.00"}}],
               "recurring_credits": [{"unit": "USD", "amount": "10.00"}]}],
}


def hybrid_app(path: Path) -> LedgerApplication:
    app = LedgerApplication(persistence_env(None, str(path)))
    run(app, "catalog.publish", None, document=HYBRID, digest="hybrid-late-usage")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="hybrid")  # Nov 1 - Dec 1, 10.00 of credit
    return app


def close_debit(app: LedgerApplication, amount: str, period: datetime, last_reading_at: datetime) -> None:
    """The ``usage.debit`` rating's close sends for a ``last`` meter: at its last reading, after ``PeriodEnded``."""
    run(app, "usage.debit", "acme", at=last_reading_at, unit="USD", amount_subunits=int(Decimal(amount) * U),
        meter="seats", overage_policy="overage",
        cause={"period": period.isoformat(), "aggregation": "last", "quantity": "3", "closed": True,
               "event_ids": [str(uuid4())]})


def tick(app: LedgerApplication, at: datetime) -> None:
    run(app, "subscription.tick", "acme", at=at, key="m")


def usage_lines(app: LedgerApplication, calls: str, seats: str, at: datetime) -> None:
    """Rating's usage lines of November (after its close debits): they finalize the Dec 1 renewal."""
    run(app, "invoice.usage_lines", "acme", at=at, invoice_key=_key(DEC_1), period_start=NOV_1.isoformat(),
        period_end=DEC_1.isoformat(), lines=[usage_line(calls), usage_line(seats, meter="seats")])


def _key(start: datetime) -> str:
    return f"{subscription_id('acme', 'm')}/{start.isoformat()}"


def renewal(app: LedgerApplication, start: datetime = DEC_1) -> Invoice:
    return app.repository.get(invoice_id("acme", _key(start)))  # type: ignore[no-any-return]


def lines(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


# When November's calls (debited as they come, at Nov 20) and seats (the close debit, at the last reading on Nov 25)
# reach the ledger, relative to the period's end (Dec 1): the Dec 1 tick, the sweeper's rounds, rating's usage lines.
Steps = Callable[[LedgerApplication, str, str], None]


def _all_before_the_end(app: LedgerApplication, calls: str, seats: str) -> None:
    debit(app, calls, NOV_1, NOV_20)
    close_debit(app, seats, NOV_1, NOV_25)
    Sweeper(app).sweep(DEC_1)
    tick(app, DEC_1)
    usage_lines(app, calls, seats, DEC_1 + timedelta(minutes=1))


def _close_debit_after_the_renewal(app: LedgerApplication, calls: str, seats: str) -> None:
    """As it always happens: rating learns the period ended from the renewal's ``PeriodEnded`` (defect 2)."""
    debit(app, calls, NOV_1, NOV_20)
    tick(app, DEC_1)
    close_debit(app, seats, NOV_1, NOV_25)
    usage_lines(app, calls, seats, DEC_1 + timedelta(minutes=1))
    Sweeper(app).sweep(DEC_1 + timedelta(minutes=2))


def _usage_after_the_sweep_before_the_tick(app: LedgerApplication, calls: str, seats: str) -> None:
    """The period's usage reaches the ledger after its end, the sweeper's round first, the tick after (defect 3)."""
    Sweeper(app).sweep(DEC_1 + timedelta(seconds=5))
    debit(app, calls, NOV_1, NOV_20)
    tick(app, DEC_1 + timedelta(seconds=30))
    close_debit(app, seats, NOV_1, NOV_25)
    usage_lines(app, calls, seats, DEC_1 + timedelta(minutes=1))


def _usage_after_the_renewal_and_the_sweep(app: LedgerApplication, calls: str, seats: str) -> None:
    tick(app, DEC_1)
    sweeper = Sweeper(app)
    sweeper.sweep(DEC_1 + timedelta(seconds=5))
    debit(app, calls, NOV_1, NOV_20)
    sweeper.sweep(DEC_1 + timedelta(hours=1))
    close_debit(app, seats, NOV_1, NOV_25)
    usage_lines(app, calls, seats, DEC_1 + timedelta(hours=2))


def _tick_days_late(app: LedgerApplication, calls: str, seats: str) -> None:
    """The ledger was down: its sweeper's first round, then the usage, then the tick, three days after the end."""
    late = DEC_1 + timedelta(days=3)
    Sweeper(app).sweep(late)
    debit(app, calls, NOV_1, NOV_20)
    tick(app, late + timedelta(seconds=30))
    close_debit(app, seats, NOV_1, NOV_25)
    usage_lines(app, calls, seats, late + timedelta(minutes=1))


ORDERS: dict[str, Steps] = {
    "before_the_end": _all_before_the_end,
    "close_debit_after_the_renewal": _close_debit_after_the_renewal,
    "usage_after_the_sweep_before_the_tick": _usage_after_the_sweep_before_the_tick,
    "usage_after_the_renewal_and_the_sweep": _usage_after_the_renewal_and_the_sweep,
    "tick_days_late": _tick_days_late,
}


def _november(path: Path, order: str, calls: str, seats: str) -> dict[str, Any]:
    """November's usage in ``order``, then the sweeper after the late usage window and December's renewal: what the
    customer and the books see, November's renewal invoice and the grants."""
    app = hybrid_app(path)
    ORDERS[order](app, calls, seats)
    invoice = renewal(app)
    assert invoice.status == "finalized"
    Sweeper(app).sweep(DEC_1 + LAPSES + timedelta(hours=1))
    recognise(app, DEC_1 + LAPSES + timedelta(hours=1))
    outcome = {"invoice": lines(invoice), "total": invoice.total, "books": books(app), "revenue": revenue(app),
               "receivable": account(app).receivable("USD"), "overage": account(app).overage_receivable("USD"),
               "grants": [(g["status"], g["remaining"]) for g in account(app).grant_balances()],
               "lapsed": [e.remainder for e in events(app, "GrantExpired")]}
    assert verify_store(app, "acme").ok
    app.close()
    return outcome


@pytest.mark.parametrize(("calls", "seats"), [("5.00", "9.00"), ("2.00", "3.00")], ids=["beyond_credit", "within"])
def test_the_periods_credit_pays_its_usage_the_same_whenever_it_reaches_the_ledger(
        tmp_path: Path, calls: str, seats: str) -> None:
    outcomes = {order: _november(tmp_path / order, order, calls, seats) for order in ORDERS}
    on_time = outcomes["before_the_end"]
    for order, outcome in outcomes.items():
        assert outcome == on_time, order
    used = Decimal(calls) + Decimal(seats)
    applied = min(used, Decimal("10.00"))
    assert on_time["invoice"] == [("base_fee", "50.00"), ("usage", calls), ("usage", seats),
                                  ("credits_applied", f"-{applied:.2f}")]
    assert on_time["total"] == Decimal("50.00") + used - applied
    # November's credit left lapses once, after the window; recognised: both fees' 40.00 ratably and the usage.
    lapsed = int((Decimal("10.00") - applied) * 100) * CENT
    assert on_time["lapsed"] == [lapsed]
    assert on_time["revenue"] == (int((Decimal("80.00") + used) * 100) * CENT, lapsed, 0)


def test_the_reviewers_seats_read_at_close_after_the_renewal_draw_the_credit_left(tmp_path: Path) -> None:
    """t13: 150 calls (5.00 from the 10.00 of credit) and seats reading 3 at 3.00. Before, the renewal expired the
    5.00 left to breakage and the close debit billed the seats' 9.00 in full: 59.00 and 5.00 of breakage."""
    app = hybrid_app(tmp_path)
    _close_debit_after_the_renewal(app, "5.00", "9.00")
    assert lines(renewal(app)) == [("base_fee", "50.00"), ("usage", "5.00"), ("usage", "9.00"),
                                   ("credits_applied", "-10.00")]
    assert renewal(app).total == Decimal("54.00")
    assert account(app).unbilled_overage("USD") == {}  # the 4.00 beyond credit is on this invoice, nothing later
    assert not events(app, "GrantExpired") and revenue(app)[1] == 0
    app.close()


def test_the_reviewers_usage_sent_after_the_period_before_the_tick_draws_the_credit(tmp_path: Path) -> None:
    """t1: the cycle's usage reached the ledger after the period's end, the sweeper's round before the tick. Before,
    the sweep expired the whole 10.00 of credit first: the usage was all billed (10.00 more) and 10.00 lapsed."""
    app = hybrid_app(tmp_path)
    _usage_after_the_sweep_before_the_tick(app, "12.00", "9.00")
    assert lines(renewal(app)) == [("base_fee", "50.00"), ("usage", "12.00"), ("usage", "9.00"),
                                   ("credits_applied", "-10.00")]
    assert renewal(app).total == Decimal("61.00")
    app.close()


def test_usage_of_the_period_after_its_invoice_draws_its_credit_within_the_window_and_is_billed_once(
        tmp_path: Path) -> None:
    """Usage of November that rating rates after November's close (late policy ``next_period``: in December's
    running total, at its own time) still draws November's credit while it is open, and December's renewal bills it
    once, as usage paid with credit; after the window the sweep has lapsed the credit and it is owed as overage."""
    app = hybrid_app(tmp_path)
    _close_debit_after_the_renewal(app, "2.00", "3.00")  # 5.00 of November's credit left
    debit(app, "4.00", DEC_1, NOV_25 + timedelta(hours=1))  # late, rated into December
    assert account(app).overage_receivable("USD") == 0
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("open", 100 * CENT), ("open", 1000 * CENT)]  # November's 1.00 left; December's untouched
    january = _renew_december(app, [usage_line("4.00")])
    assert lines(january) == [("base_fee", "50.00"), ("usage", "4.00"), ("credits_applied", "-4.00")]
    Sweeper(app).sweep(DEC_1 + LAPSES)
    assert [e.remainder for e in events(app, "GrantExpired")] == [100 * CENT]  # November's rest, once
    debit(app, "0.60", DEC_1, NOV_25 + timedelta(hours=2))  # later than the window: its credit has lapsed
    assert account(app).overage_receivable("USD") == 60 * CENT
    Sweeper(app).sweep(DEC_1 + LAPSES + timedelta(hours=1))
    assert len(events(app, "GrantExpired")) == 1
    assert verify_store(app, "acme").ok
    app.close()


def _renew_december(app: LedgerApplication, usage: list[dict[str, str]]) -> Invoice:
    tick(app, JAN_1)
    run(app, "invoice.usage_lines", "acme", at=JAN_1, invoice_key=_key(JAN_1), period_start=DEC_1.isoformat(),
        period_end=JAN_1.isoformat(), lines=usage)
    return renewal(app, JAN_1)


@pytest.mark.parametrize("ending", ["cancel_at_period_end", "pause"])
def test_a_period_that_ends_without_a_renewal_credit_leaves_its_credit_open_for_its_usage_too(
        tmp_path: Path, ending: str) -> None:
    """A cancel at the period's end or a paused renewal grants no next credit, and the close debit after it still
    draws the ended period's credit; the sweep lapses the rest after the window."""
    app = hybrid_app(tmp_path)
    debit(app, "5.00", NOV_1, NOV_20)
    if ending == "pause":
        run(app, "subscription.pause", "acme", at=NOV_25, key="m")
    else:
        run(app, "subscription.cancel", "acme", at=NOV_25, key="m", immediately=False)
    tick(app, DEC_1)
    close_debit(app, "3.00", NOV_1, NOV_25)
    assert account(app).overage_receivable("USD") == 0
    assert account(app).spendable("USD", "seats", DEC_1) == 0  # not drawn by usage after the period
    Sweeper(app).sweep(DEC_1 + LAPSES)
    assert [e.remainder for e in events(app, "GrantExpired")] == [200 * CENT]
    assert account(app).balance("USD") == 0
    assert verify_store(app, "acme").ok
    app.close()


def test_a_plan_credit_granted_before_session_13_expires_at_its_periods_end_as_recorded(tmp_path: Path) -> None:
    """A non-rollover grant recorded before (no ``drawable_until``, ``expires_at`` the period's end, no
    ``late_usage``) replays as it was: drawn until its end, and the sweep expires it then."""
    app = hybrid_app(tmp_path)
    stream = list(app.events.get(account(app).id))
    [granted] = [e for e in stream if type(e).__name__ == "CreditGranted"]
    assert (granted.drawable_until, granted.expires_at, granted.late_usage) == (DEC_1, DEC_1 + LAPSES, True)
    object.__setattr__(granted, "expires_at", DEC_1)  # as recorded before session 13
    object.__delattr__(granted, "drawable_until")
    object.__delattr__(granted, "late_usage")
    replayed = None
    for event in stream:
        replayed = event.mutate(replayed)
    assert replayed is not None and not replayed.open_for_late_usage(granted.grant_id)
    assert replayed.grants_expiring_by(DEC_1)  # the sweep expires it at the period's end, as then
    replayed.expire_grants(DEC_1)
    assert [(g["status"], g["remaining"]) for g in replayed.grant_balances()] == [("expired", 0)]
    app.close()
