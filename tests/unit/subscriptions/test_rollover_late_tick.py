"""A plan credit with rollover is drawn only by usage of its own period: usage after the period's end that reaches
the ledger before a late tick waits for the next period's credit, as with a tick on time, and the renewal carries
(up to ``rollover_cap``) and lapses the ended period's credit left the same way, whether the expiry sweep or the
tick runs first (docs/subscriptions.md "Credits of a period ticked late"). SQLite ledger, real commands; the chart
of accounts is read from the account's events' postings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_included_credit_revenue import recognise, revenue, rollover_app
from tests.unit.subscriptions.test_invoice_books import account, books
from tests.unit.subscriptions.test_invoice_overage import debit, renew_and_bill, run, usage_line

U = 10**9
CENT = U // 100
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_20 = datetime(2026, 11, 20, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
DEC_2 = datetime(2026, 12, 2, tzinfo=UTC)
DEC_3 = datetime(2026, 12, 3, tzinfo=UTC)
JAN_1 = datetime(2027, 1, 1, tzinfo=UTC)
# The Dec 1 tick on time; late, after December's first usage; late, the expiry sweep of Dec 1 run before it too.
TICKS = ["on_time", "late", "late_after_sweep"]


def _november(app: LedgerApplication, tick: str, december_usage: str = "3.00") -> None:
    """Team 30.00 with 10.00 USD included, rollover capped at 2.00: 4.00 used in November (6.00 left), then
    ``december_usage`` on Dec 2, rated into December, with the Dec 1 tick at ``tick``."""
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    if tick == "on_time":
        renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])
        debit(app, december_usage, DEC_1, DEC_2)
        return
    if tick == "late_after_sweep":
        recognise(app, DEC_1)  # the sweeper at the period's end: grant.expire and money.recognise
    debit(app, december_usage, DEC_1, DEC_2)  # before the tick: the ledger has no December credit yet
    renew_and_bill(app, NOV_1, DEC_1, [usage_line("4.00")])


def _lines(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


def _invoice(app: LedgerApplication, key: str) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{key}"))  # type: ignore[no-any-return]


def _outcome(app: LedgerApplication) -> dict[str, Any]:
    """What the customer and the books see: the chart of accounts, credit left, each grant's state."""
    return {"books": books(app), "available": account(app).available("USD"),
            "receivable": account(app).receivable("USD"),
            "grants": [(g["status"], g["amount"], g["remaining"]) for g in account(app).grant_balances()]}


@pytest.mark.parametrize("tick", TICKS)
def test_a_late_tick_pays_the_next_periods_usage_from_its_credit_and_lapses_the_rest_as_on_time(
        tmp_path: Path, tick: str) -> None:
    app = rollover_app(tmp_path)
    _november(app, tick)
    december = _invoice(app, DEC_1.isoformat())
    # December's 30.00 and November's 4.00 of usage paid by November's credit: nothing of December on it.
    assert _lines(december) == [("base_fee", "30.00"), ("usage", "4.00"), ("credits_applied", "-4.00")]
    # November's 6.00 left: 2.00 carried into December's 12.00, 4.00 lapsed; December's 3.00 from December's
    # grant. Before, the late tick's December usage was drawn from November's credit: 1.00 lapsed, 12.00 left.
    assert -books(app)[("breakage", "USD")] == 400 * CENT
    assert account(app).available("USD") == 900 * CENT
    assert account(app).grant_balances()[-1]["remaining"] == 900 * CENT
    assert account(app).receivable("USD") == 3000 * CENT + 3000 * CENT  # the two fees; no overage owed
    january = renew_and_bill(app, DEC_1, JAN_1, [usage_line("3.00")])
    assert _lines(january) == [("base_fee", "30.00"), ("usage", "3.00"), ("credits_applied", "-3.00")]
    recognise(app, JAN_1)
    # December's 9.00 left: 2.00 carried, 7.00 lapsed. November: 20.00 + 4.00 used; December 20.00 + 3.00 used.
    assert revenue(app) == (4700 * CENT, 1100 * CENT, 2000 * CENT)
    assert verify_store(app, "acme").ok
    app.close()


def test_the_late_tick_ends_with_the_books_and_credit_of_the_tick_on_time(tmp_path: Path) -> None:
    outcomes = {}
    for tick in TICKS:
        app = rollover_app(tmp_path / tick)
        _november(app, tick, december_usage="7.50")  # more than November's 6.00 left: all of it was drawn
        renew_and_bill(app, DEC_1, JAN_1, [usage_line("7.50")])
        recognise(app, JAN_1)
        outcomes[tick] = _outcome(app)
        app.close()
    assert outcomes["late"] == outcomes["on_time"]
    assert outcomes["late_after_sweep"] == outcomes["on_time"]
    # December's 12.00 (10.00 + 2.00 carried) paid its 7.50: 4.50 left, 2.00 carried into January.
    assert outcomes["on_time"]["available"] == 1200 * CENT


@pytest.mark.parametrize("command", ["cancel", "change", "pause"])
def test_a_command_that_renews_first_pays_the_next_periods_usage_from_its_credit(
        tmp_path: Path, command: str) -> None:
    """An immediate cancel, a change or a pause on Dec 3, the Dec 1 tick not run, renews first: the outcome is
    the tick on time followed by the command."""
    outcomes = {}
    for tick in ("on_time", "late"):
        app = rollover_app(tmp_path / tick)
        _november(app, tick)
        if command == "cancel":
            run(app, "subscription.cancel", "acme", at=DEC_3, key="m", immediately=True)
        elif command == "change":
            run(app, "subscription.change", "acme", at=DEC_3, key="m", quantity=2)
        else:
            run(app, "subscription.pause", "acme", at=DEC_3, key="m")
        recognise(app, DEC_3 + timedelta(days=45))
        outcomes[tick] = _outcome(app)
        app.close()
    assert outcomes["late"] == outcomes["on_time"]
    assert -outcomes["on_time"]["books"][("breakage", "USD")] >= 400 * CENT  # November's 4.00 above the cap


def test_a_rollover_credit_is_not_drawn_after_its_period_but_its_renewal_still_carries_it(tmp_path: Path) -> None:
    """The credit left at the period's end stays open (the sweep does not expire it) until the renewal decides:
    usage after the end goes to overage meanwhile, never to it."""
    app = rollover_app(tmp_path)
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "4.00", NOV_1, NOV_20)
    recognise(app, DEC_1 + timedelta(hours=1))
    [november] = account(app).grant_balances()
    assert (november["status"], november["remaining"]) == ("open", 600 * CENT)
    debit(app, "1.00", DEC_1, DEC_1 + timedelta(minutes=5))
    assert account(app).overage_receivable("USD") == 100 * CENT
    assert account(app).balance("USD") == 600 * CENT  # not drawn
    run(app, "subscription.tick", "acme", at=DEC_2, key="m")
    assert account(app).overage_receivable("USD") == 0  # repaid by December's grant
    assert [(g["status"], g["remaining"]) for g in account(app).grant_balances()] == [
        ("voided", 0), ("open", 1100 * CENT)]  # 10.00 + 2.00 carried - 1.00
    assert Decimal(-books(app)[("breakage", "USD")]) == 400 * CENT
    app.close()
