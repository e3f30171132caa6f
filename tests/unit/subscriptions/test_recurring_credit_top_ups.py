"""Auto-top-up rules and a plan's recurring credit: a renewal, change or cancel voids the old grant and then
grants (the next period's credit, a credit note), and only the balance it leaves counts (SQLite ledger)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_invoice_overage import debit, run

U = 10**9
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_10 = datetime(2026, 11, 10, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "100.00",
               "recurring_credits": [{"unit": "USD", "amount": "100"}]},
              {"code": "basic", "name": "Basic", "currency": "USD", "base_fee": "10.00"}],
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    """Team (100.00 a month, all of it USD credit) from Nov 1, its invoice paid, a rule "below 55.00 top up to
    80.00", and 40.00 of it used: 60.00 left."""
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    run(ledger, "account.open", "acme", currency="USD")
    run(ledger, "subscription.create", "acme", key="m", plan="team")
    first = invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}")
    run(ledger, "invoice.mark_paid", "acme", invoice_id=str(first), payment="pi_0")
    run(ledger, "auto_top_up.set", "acme", threshold="55", target="80", cooldown_seconds=0, monthly_cap="500")
    debit(ledger, "40.00", NOV_1, NOV_10)
    return ledger


def top_ups(app: LedgerApplication) -> list[int]:
    return [e.amount for e in app.events.get(ids.account_id("acme")) if type(e).__name__ == "AutoTopUpRequested"]


def available(app: LedgerApplication) -> int:
    return app.repository.get(ids.account_id("acme")).available("USD")  # type: ignore[no-any-return]


def test_a_renewal_with_credit_left_requests_no_auto_top_up(app: LedgerApplication) -> None:
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")
    # December's 100.00 granted; November's 60.00 left is set aside for November's late usage (it lapses
    # RECURRING_CREDIT_LATE_USAGE_DAYS later), no longer drawn by new usage: what is available never fell below 55.00.
    account = app.repository.get(ids.account_id("acme"))
    spendable = account.spendable("USD", "api_calls", DEC_1)
    assert (available(app), account.late_usage_reserve("USD"), spendable, top_ups(app)) == (
        100 * U, 60 * U, 100 * U, [])


def test_an_immediate_cancel_requests_no_auto_top_up_but_the_next_usage_below_the_threshold_does(
        app: LedgerApplication) -> None:
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    # The 60.00 of plan credit is voided; the credit note gives 50.00 back for the half month not used. The
    # customer who just canceled is not charged a top-up by the cancel itself.
    assert (available(app), top_ups(app)) == (50 * U, [])
    debit(app, "1.00", NOV_1, NOV_16)  # the rule stays armed
    assert top_ups(app) == [31 * U]  # to 80.00 from 49.00


def test_a_change_that_really_leaves_the_balance_below_the_threshold_tops_up_once(app: LedgerApplication) -> None:
    run(app, "subscription.change", "acme", at=NOV_16, key="m", plan="basic")
    # Team's 60.00 voided, no credit on Basic; the credit note: 50.00 of Team back, 5.00 of Basic charged.
    assert available(app) == 45 * U
    assert top_ups(app) == [35 * U]  # once, on what the change leaves (not 80.00 on the 0 between its steps)
