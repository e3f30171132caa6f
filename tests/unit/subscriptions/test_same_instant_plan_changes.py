"""Two subscription commands at the same instant (an upgrade and a change back, a change and an immediate cancel, a
renewal and a change or cancel at the period's end) keep the plan credit carried from grant to grant exact, and
usage of before that instant that reaches the ledger after them still draws it (docs/subscriptions.md "Credits at a
plan or quantity change"). The second command cuts the grant the first one issued at its own start and voids it;
before session 15 that void broke the link the kept grant had to it (``carry``), so the usage was owed as overage
though the credit was there, and a cancel's void sent the carry back to deferred revenue. They are applied in the
order they were recorded. SQLite ledger, real commands."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_included_credit_revenue import revenue
from tests.unit.subscriptions.test_invoice_books import events
from tests.unit.subscriptions.test_invoice_overage import debit, run
from tests.unit.subscriptions.test_late_usage_after_rollover_and_cut import (
    CENT,
    DEC_1,
    JAN_1,
    LAPSES,
    NOV_1,
    NOV_10,
    NOV_15,
    NOV_16,
    NOV_25,
    account,
    close_debit,
    lines,
    outcome,
    subscribed,
    tick,
    usage_lines,
)

Command = Callable[[LedgerApplication], None]


def _change(at: Any, **payload: Any) -> Command:
    return lambda app: run(app, "subscription.change", "acme", at=at, key="m", **payload)


def _cancel(at: Any) -> Command:
    return lambda app: run(app, "subscription.cancel", "acme", at=at, key="m", immediately=True)


# 50.00 a month with 10.00 of credit; 4.00 used on Nov 10, then the commands at Nov 16 (half the period left).
AT_NOV_16: dict[str, list[Command]] = {
    "upgrade_and_back": [_change(NOV_16, quantity=3), _change(NOV_16, quantity=1)],
    "upgrade_back_and_upgrade": [_change(NOV_16, quantity=3), _change(NOV_16, quantity=1), _change(NOV_16, quantity=3)],
    "upgrade_and_cancel": [_change(NOV_16, quantity=3), _cancel(NOV_16)],
    "upgrade_and_downgrade_to_no_credit": [_change(NOV_16, quantity=3), _change(NOV_16, plan="lite")],
}


def _run_at_nov_16(path: Path, commands: list[Command], rollover: bool, late: bool) -> dict[str, Any]:
    """The seats' close debit of 3.00 (last reading Nov 15) before the commands or (``late``) after them, as rating
    sends it after a cut; then the late usage window closes."""
    app = subscribed(path, rollover)
    debit(app, "4.00", NOV_1, NOV_10)
    if not late:
        close_debit(app, "3.00", NOV_1, NOV_15)
    for command in commands:
        command(app)
    if late:
        close_debit(app, "3.00", NOV_1, NOV_15)
    Sweeper(app).sweep(NOV_16 + LAPSES + timedelta(hours=1))
    found = outcome(app, [])
    app.close()
    return found


@pytest.mark.parametrize("rollover", [False, True], ids=["no_rollover", "rollover"])
@pytest.mark.parametrize("commands", AT_NOV_16)
def test_usage_from_before_two_commands_at_one_instant_draws_the_credit_carried_through_them(
        tmp_path: Path, commands: str, rollover: bool) -> None:
    on_time = _run_at_nov_16(tmp_path / "on_time", AT_NOV_16[commands], rollover, late=False)
    late = _run_at_nov_16(tmp_path / "late", AT_NOV_16[commands], rollover, late=True)
    # 7.00 of usage before Nov 16 within the 10.00 of November's credit: nothing owed, whenever it came (the late
    # 3.00 was owed: the upgrade's grant it was carried into was voided by the second command).
    assert late["overage"] == on_time["overage"] == 0
    assert late == on_time


def _credit_left(path: Path, commands: list[Command]) -> dict[str, Any]:
    """4.00 used on Nov 10, ``commands`` at Nov 16, the seats' 3.00 of Nov 15 after them; then the window closes and the
    period's credit lapses: what the customer had of the credit, what lapsed, revenue and breakage."""
    app = subscribed(path, rollover=False)
    debit(app, "4.00", NOV_1, NOV_10)
    for command in commands:
        command(app)
    close_debit(app, "3.00", NOV_1, NOV_15)
    plan = [g["remaining"] for g in account(app).grant_balances() if g["source"] == "plan_recurrence"]
    Sweeper(app).sweep(DEC_1 + LAPSES + timedelta(hours=1))
    found = {"left": sum(plan), "owed": account(app).overage_receivable("USD"), "revenue": revenue(app),
             "lapsed": sum(e.remainder for e in events(app, "GrantExpired"))}
    app.close()
    return found


@pytest.mark.parametrize("there", [_change(NOV_16, quantity=3), _change(NOV_16, plan="lite")],
                         ids=["upgrade", "downgrade_to_no_credit"])
def test_a_change_and_a_change_back_at_one_instant_leave_the_credit_no_change_leaves(
        tmp_path: Path, there: Command) -> None:
    """Hybrid to Lite (no credit) and back at Nov 16 kept November's 6.00 in its grant for late usage only (the seats
    drew 3.00 of it, 3.00 lapsed), then granted the change back 5.00 for the rest of November, where no change leaves
    3.00: the 2.00 used beyond the elapsed half was forgotten. An upgrade and back owed the seats' 3.00."""
    none = _credit_left(tmp_path / "none", [])
    back = _credit_left(tmp_path / "there_and_back", [there, _change(NOV_16, plan="hybrid", quantity=1)])
    assert back == none == {"left": 300 * CENT, "owed": 0, "revenue": none["revenue"], "lapsed": 300 * CENT}


def test_an_upgrade_and_a_change_back_at_one_instant_leave_the_credit_no_change_leaves(tmp_path: Path) -> None:
    app = subscribed(tmp_path)
    debit(app, "4.00", NOV_1, NOV_10)
    for command in AT_NOV_16["upgrade_and_back"]:
        command(app)
    close_debit(app, "3.00", NOV_1, NOV_15)
    # The change back's grant: 5.00 for the rest of November and the 1.00 used beyond the elapsed half's 5.00 taken
    # off, less the seats' 3.00 drawn from the carry through both changes: 3.00 left, as with no change at all.
    assert account(app).overage_receivable("USD") == 0
    plan = [g for g in account(app).grant_balances()
            if g["source"] == "plan_recurrence" and g["status"] == "open" and g["remaining"]]
    assert [g["remaining"] for g in plan] == [300 * CENT]
    app.close()


def test_an_upgrade_and_an_immediate_cancel_at_one_instant_bill_the_period_as_the_cancel_alone(
        tmp_path: Path) -> None:
    """The final invoice of [Nov 1, Nov 16) shows the seats paid with credit, and the credit left lapses after the
    window as a cancel alone lapses it (before: 3.00 of the seats owed, and the 6.00 carried back to deferred
    revenue at the cancel)."""
    found = {}
    for name, commands in (("cancel", [_cancel(NOV_16)]), ("upgrade_and_cancel", AT_NOV_16["upgrade_and_cancel"])):
        app = subscribed(tmp_path / name, rollover=False)
        debit(app, "4.00", NOV_1, NOV_10)
        for command in commands:
            command(app)
        close_debit(app, "3.00", NOV_1, NOV_15)
        final = usage_lines(app, NOV_16, NOV_1, NOV_16, "4.00", "3.00", NOV_16 + timedelta(hours=1))
        Sweeper(app).sweep(NOV_16 + LAPSES + timedelta(hours=1))
        found[name] = {"final": (lines(final), final.total), "overage": account(app).overage_receivable("USD"),
                       "lapsed": sorted(e.remainder for e in events(app, "GrantExpired"))}
        app.close()
    assert found["upgrade_and_cancel"] == found["cancel"] == {
        "final": ([("usage", "4.00"), ("usage", "3.00"), ("credits_applied", "-7.00")], Decimal(0)),
        "overage": 0, "lapsed": [300 * CENT]}


@pytest.mark.parametrize("second", ["change", "cancel"])
def test_a_command_at_the_instant_of_a_renewal_keeps_the_rollover_carry_for_the_periods_late_usage(
        tmp_path: Path, second: str) -> None:
    """4.00 used in November: the Dec 1 renewal carries 2.00 into December's grant and keeps 4.00 for November's late
    usage; an upgrade (or an immediate cancel) at Dec 1 voids December's grant at its start. The seats' 5.00 of
    November after both draw the 4.00 kept and 1.00 of the carry, wherever it went: nothing owed (it was 1.00)."""
    app = subscribed(tmp_path)
    debit(app, "4.00", NOV_1, NOV_10)
    tick(app, DEC_1)
    (_change(DEC_1, quantity=3) if second == "change" else _cancel(DEC_1))(app)
    close_debit(app, "5.00", NOV_1, NOV_25)
    assert account(app).overage_receivable("USD") == 0
    on_time = subscribed(tmp_path / "on_time")
    debit(on_time, "4.00", NOV_1, NOV_10)
    close_debit(on_time, "5.00", NOV_1, NOV_25)
    tick(on_time, DEC_1)
    (_change(DEC_1, quantity=3) if second == "change" else _cancel(DEC_1))(on_time)
    Sweeper(app).sweep(JAN_1 + LAPSES)
    Sweeper(on_time).sweep(JAN_1 + LAPSES)
    assert outcome(app, []) == outcome(on_time, [])
    on_time.close()
    app.close()
