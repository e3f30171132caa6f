"""Usage of before a downgrade that reaches the ledger after it draws the allowance of the plan it happened under, not
only what the new plan's grant holds (docs/subscriptions.md "Credits at a plan or quantity change"). The change moves
the old grant's rest into the new grant, which is granted the new plan's allotment for the rest of the period plus that
rest less the old allotment for it: after more than the elapsed time's share was used, less than the rest. On time,
more usage before the change lowers the new grant, to nothing, and what the old grant still has then stays in it for
that usage. Before session 15 late usage drew at most the new grant and the rest was owed as overage, though the old
plan's allowance had it. SQLite ledger, real commands; the chart of accounts is read from the account's events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_included_credit_revenue import recognise, revenue
from tests.unit.subscriptions.test_invoice_books import account, books, events
from tests.unit.subscriptions.test_invoice_overage import run, usage_line
from tests.unit.subscriptions.test_late_usage_after_rollover_and_cut import (
    CENT,
    DEC_1,
    LAPSES,
    NOV_1,
    NOV_10,
    NOV_15,
    U,
    lines,
    tick,
)

# Nov 17 12:00: 16.5 of November's 30 days gone, 0.45 of the period left.
CHANGE = datetime(2026, 11, 17, 12, tzinfo=UTC)


def catalog(unit: str) -> dict[str, Any]:
    """Pro: 1,000 of credit a month; Starter: 200. In CREDIT (1 a call) or in USD (1.00 a call, part of the fee)."""
    credits = {"CREDIT": {"scale": 2, "list_price": "0.10", "currency": "USD"}}
    return {"credit_units": credits,
            "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": unit, "unit_amount": "1"}}],
            "plans": [{"code": "pro", "name": "Pro", "currency": "USD", "base_fee": "1000.00",
                       "recurring_credits": [{"unit": unit, "amount": "1000"}]},
                      {"code": "starter", "name": "Starter", "currency": "USD", "base_fee": "200.00",
                       "recurring_credits": [{"unit": unit, "amount": "200"}]}]}


def calls(app: LedgerApplication, unit: str, amount: str, at: datetime) -> None:
    run(app, "usage.debit", "acme", at=at, unit=unit, amount_subunits=int(Decimal(amount) * U), meter="api_calls",
        overage_policy="overage", cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})


def _downgrade(path: Path, unit: str, late: bool, before: str = "600", after: str = "150") -> LedgerApplication:
    """``before`` calls on Nov 10, the downgrade to Starter on Nov 17 12:00, ``after`` calls of Nov 15 before the
    change or (``late``) after it."""
    app = LedgerApplication(persistence_env(None, str(path)))
    run(app, "catalog.publish", None, document=catalog(unit), digest=f"downgrade-{unit}")
    run(app, "account.open", "acme", currency="USD")
    run(app, "subscription.create", "acme", key="m", plan="pro")
    calls(app, unit, before, NOV_10)
    if not late:
        calls(app, unit, after, NOV_15)
    run(app, "subscription.change", "acme", at=CHANGE, key="m", plan="starter")
    if late:
        calls(app, unit, after, NOV_15)
    return app


def _outcome(app: LedgerApplication, unit: str) -> dict[str, Any]:
    """What the customer and the books see once the late usage window of the change is over."""
    recognise(app, CHANGE + LAPSES + timedelta(hours=1))
    assert verify_store(app, "acme").ok
    return {"owed": account(app).overage_receivable(unit), "books": books(app), "revenue": revenue(app),
            "lapsed": sorted(e.remainder for e in events(app, "GrantExpired"))}


@pytest.mark.parametrize("unit", ["CREDIT", "USD"])
@pytest.mark.parametrize(("before", "after"), [("600", "150"), ("300", "500"), ("600", "50"), ("300", "100")],
                         ids=["used_more_than_its_share", "late_beyond_the_new_grant", "late_within_the_rest",
                              "late_within_the_new_grant"])
def test_late_usage_from_before_a_downgrade_draws_the_old_plans_allowance_as_on_time(
        tmp_path: Path, unit: str, before: str, after: str) -> None:
    on_time = _outcome(_downgrade(tmp_path / "on_time", unit, False, before, after), unit)
    late = _outcome(_downgrade(tmp_path / "late", unit, True, before, after), unit)
    assert late["owed"] == on_time["owed"] == 0  # within Pro's 1,000 until the change
    assert late == on_time


def test_the_reviewers_downgrade_bills_no_overage_for_late_usage_within_the_old_allowance(tmp_path: Path) -> None:
    """Pro (1,000 of credit) to Starter (200) on Nov 17 12:00 after 600 used: Starter's grant is 90 for the rest of
    November less the 50 used beyond the elapsed share, 40; 150 of Nov 15 come after the change. They drew the 40 and
    110 were owed (billed on December's invoice); they now draw the 40 and 110 of Pro's allowance, whose 250 left
    lapse after the window, as on time."""
    app = _downgrade(tmp_path, "USD", late=True)
    assert account(app).overage_receivable("USD") == 0
    plan = [(g["amount"] - g["carry_drawn"], g["remaining"]) for g in account(app).grant_balances()
            if g["source"] == "plan_recurrence"]
    assert plan == [(100_000 * CENT, 250 * 100 * CENT), (0, 0)]  # Pro's, kept for late usage; Starter's, drawn
    tick(app, DEC_1)  # rating's usage lines of November finalize the renewal invoice
    key = f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=DEC_1 + timedelta(hours=1), invoice_key=key,
        period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat(), lines=[usage_line("750.00")])
    december = app.repository.get(invoice_id("acme", key))
    # It billed 310.00: 110.00 of the calls owed beyond the 640.00 of credit applied.
    assert (lines(december), december.total) == (
        [("base_fee", "200.00"), ("usage", "750.00"), ("credits_applied", "-750.00")], Decimal("200.00"))
    app.close()


@pytest.mark.parametrize("unit", ["CREDIT", "USD"])
def test_a_downgrade_and_a_change_back_at_one_instant_leave_the_allowance_no_change_leaves(
        tmp_path: Path, unit: str) -> None:
    """750 used of Pro's 1,000 before Nov 17 12:00: Starter's grant would come to nothing (90 less the 200 used beyond
    the elapsed share), so the downgrade grants none and Pro's grant keeps its 250 for late usage only. The change back
    to Pro at the same instant granted 450 less Starter's 90 (360) and let the 250 lapse; it now takes them on: Pro's
    grant for the rest of November is the 250 left, as with no change."""
    found = {}
    for name, changes in (("none", []), ("there_and_back", ["starter", "pro"])):
        app = LedgerApplication(persistence_env(None, str(tmp_path / name)))
        run(app, "catalog.publish", None, document=catalog(unit), digest=f"downgrade-{unit}")
        run(app, "account.open", "acme", currency="USD")
        run(app, "subscription.create", "acme", key="m", plan="pro")
        calls(app, unit, "750", NOV_10)
        for plan in changes:
            run(app, "subscription.change", "acme", at=CHANGE, key="m", plan=plan)
        left = sum(g["remaining"] for g in account(app).grant_balances() if g["source"] == "plan_recurrence")
        outcome = _outcome(app, unit)
        found[name] = {"left": left, "lapsed": sum(outcome["lapsed"]), "revenue": outcome["revenue"]}
        app.close()
    assert found["there_and_back"] == found["none"]
    assert found["none"]["left"] == 250 * 100 * CENT
