"""A plan credit whose period has ended is set aside for that period's late usage: in the wallet's balance, no longer
in what new usage can spend (``available``), so the low-balance alert and the auto-top-up rule cross when the period
ends, holds and ``block`` usage never count it, and the period's late usage still draws it until it lapses
(docs/ledger.md "Included credit"). Before, for the 35 days such a credit stays open, it counted in ``available``:
alerts and top-ups came late by that much, and ``block`` usage was refused while the balance showed credit. SQLite
ledger, real commands, the sweeper's rounds."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import verify_store
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_invoice_books import account, events
from tests.unit.subscriptions.test_invoice_overage import debit, run
from tests.unit.subscriptions.test_period_credit_late_usage import (
    CENT,
    DEC_1,
    LAPSES,
    NOV_1,
    NOV_20,
    NOV_25,
    close_debit,
    hybrid_app,
    tick,
)

END = DEC_1 + timedelta(seconds=5)  # the sweeper's first round after the period's end
# How November (10.00 of included credit, 4.00 used) ends: the sweeper's round before the tick (which then renews),
# a paused renewal (no December credit) or a cancel at the period's end (no auto-top-up for a customer who leaves).
ENDINGS = ("sweep_before_the_tick", "paused_renewal", "cancel_at_period_end")


def _with_alerts(path: Path, *, monthly_cap: str = "500", cooldown_seconds: int = 0) -> LedgerApplication:
    """The hybrid plan (10.00 of credit a month), a low-balance alert below 5.00 and a rule "below 5.00, top up to
    20.00", and 4.00 of November's credit used: 6.00 left, above both thresholds."""
    app = hybrid_app(path)
    run(app, "low_balance.set", "acme", threshold="5.00", unit="USD")
    run(app, "auto_top_up.set", "acme", threshold="5.00", target="20.00", cooldown_seconds=cooldown_seconds,
        monthly_cap=monthly_cap)
    debit(app, "4.00", NOV_1, NOV_20)
    assert (account(app).available("USD"), events(app, "LowBalanceReached")) == (600 * CENT, [])
    return app


def _end_november(app: LedgerApplication, ending: str) -> None:
    if ending == "sweep_before_the_tick":
        Sweeper(app).sweep(END)
        return
    if ending == "paused_renewal":
        run(app, "subscription.pause", "acme", at=NOV_25, key="m")
    else:
        run(app, "subscription.cancel", "acme", at=NOV_25, key="m", immediately=False)
    tick(app, DEC_1)
    Sweeper(app).sweep(END)  # after the renewal: nothing left to set aside


def _wallet(app: LedgerApplication) -> tuple[int, int, int, int]:
    a = account(app)
    return a.balance("USD"), a.available("USD"), a.held("USD"), a.late_usage_reserve("USD")


def _alerts(app: LedgerApplication) -> list[tuple[Any, ...]]:
    return [("low", e.available, e.at) for e in events(app, "LowBalanceReached")] + [
        ("top_up", e.amount, e.available, e.at) for e in events(app, "AutoTopUpRequested")]


@pytest.mark.parametrize("ending", ENDINGS)
def test_the_ended_periods_credit_leaves_what_can_be_spent_and_the_alerts_cross_once_then(
        tmp_path: Path, ending: str) -> None:
    app = _with_alerts(tmp_path)
    _end_november(app, ending)
    at = END if ending == "sweep_before_the_tick" else DEC_1
    top_up = [] if ending == "cancel_at_period_end" else [("top_up", 2000 * CENT, 0, at)]  # to 20.00 from 0
    assert _alerts(app) == [("low", 0, at), *top_up]
    # The 6.00 left stays in the balance for November's late usage, but new usage cannot spend it: 0 available.
    assert _wallet(app) == (600 * CENT, 0, 0, 600 * CENT)
    assert account(app).spendable("USD", "api_calls", at) == 0
    # Exactly once: later rounds of the sweeper set nothing aside again and cross nothing.
    sweeper = Sweeper(app)
    sweeper.sweep(END + timedelta(seconds=5))
    sweeper.sweep(END + timedelta(days=1))
    assert len(events(app, "GrantSetAside")) == 1 and _alerts(app) == [("low", 0, at), *top_up]
    if ending == "sweep_before_the_tick":
        # The renewal then grants December's 10.00: above both thresholds again, nothing more requested.
        tick(app, END + timedelta(seconds=25))
        assert _wallet(app) == (1600 * CENT, 1000 * CENT, 0, 600 * CENT)
        assert _alerts(app) == [("low", 0, at), *top_up]
    assert verify_store(app, "acme").ok  # replayed from the events: the same balance, available and reserve
    app.close()


def test_a_renewal_that_grants_the_next_periods_credit_crosses_nothing(tmp_path: Path) -> None:
    """The tick first: November's 6.00 is set aside and December's 10.00 granted in one command; only what it leaves
    (10.00 available) counts, so no alert and no top-up for the moment between the two."""
    app = _with_alerts(tmp_path)
    tick(app, DEC_1)
    Sweeper(app).sweep(END)
    assert _wallet(app) == (1600 * CENT, 1000 * CENT, 0, 600 * CENT)
    assert _alerts(app) == [] and len(events(app, "GrantSetAside")) == 1
    app.close()


@pytest.mark.parametrize(("cooldown_seconds", "monthly_cap"), [(3600, "500"), (0, "17")],
                         ids=["cooling_down", "over_the_months_cap"])
def test_the_top_up_at_the_periods_end_respects_the_cooldown_and_the_cap(
        tmp_path: Path, cooldown_seconds: int, monthly_cap: str) -> None:
    """A top-up already requested just before the period's end (the wallet dipped below 5.00, then a grant brought it
    back): at the period's end the rule stays armed, within its hour of cooldown or over its cap of 17.00 a month
    (18.00 to reach 20.00), and the next movement allowed to requests it, once."""
    app = _with_alerts(tmp_path, monthly_cap=monthly_cap, cooldown_seconds=cooldown_seconds)
    debit(app, "2.00", NOV_1, DEC_1 - timedelta(minutes=10))  # 4.00 left: the first request, 16.00
    run(app, "credit.grant", "acme", grant_key="bought", unit="USD", amount="2.00")  # 6.00: re-armed
    assert [e.amount for e in events(app, "AutoTopUpRequested")] == [1600 * CENT]
    run(app, "subscription.pause", "acme", at=DEC_1 - timedelta(minutes=5), key="m")
    tick(app, DEC_1)  # November's 4.00 set aside: 2.00 available
    assert len(events(app, "LowBalanceReached")) == 2  # November's dip, and the period's end
    assert [e.amount for e in events(app, "AutoTopUpRequested")] == [1600 * CENT]  # not at the period's end
    assert _wallet(app)[1:] == (200 * CENT, 0, 400 * CENT)
    run(app, "credit.grant", "acme", grant_key="manual", unit="USD", amount="1.50")  # 3.50: still below 5.00
    debit(app, "0.01", DEC_1, DEC_1 + timedelta(hours=2))  # past the cooldown; 16.51 is within the cap
    assert [e.amount for e in events(app, "AutoTopUpRequested")] == [1600 * CENT, 1651 * CENT]  # to 20.00 from 3.49
    assert len(events(app, "LowBalanceReached")) == 2
    app.close()


def test_block_usage_after_the_end_is_refused_and_holds_never_reserve_the_credit_set_aside(tmp_path: Path) -> None:
    """Paused at the period's end (no December credit): 6.00 of November's credit set aside, 1.00 bought after it.
    New usage with the ``block`` policy beyond the 1.00 is refused, and holds reserve at most that 1.00 (before, the
    second hold was accepted on the credit set aside: 1.30 held on 1.00 new usage can draw)."""
    app = _with_alerts(tmp_path)
    _end_november(app, "paused_renewal")
    run(app, "credit.grant", "acme", grant_key="bought", unit="USD", amount="1.00")
    after = DEC_1 + timedelta(hours=1)
    run(app, "usage.debit", "acme", at=after, unit="USD", amount_subunits=300 * CENT, meter="api_calls",
        overage_policy="block", cause={"event_ids": [str(uuid4())], "period": DEC_1.isoformat()})
    assert [e.spendable for e in events(app, "UsageRejected")] == [100 * CENT]
    hold = {"unit": "USD", "expires_at": (after + timedelta(hours=1)).isoformat()}
    placed = run(app, "hold.place", "acme", at=after, hold_id=str(uuid4()), amount="0.80", **hold).value
    refused = run(app, "hold.place", "acme", at=after, hold_id=str(uuid4()), amount="0.50", **hold).value
    assert (placed["status"], refused["status"]) == ("active", "rejected")
    assert _wallet(app) == (700 * CENT, 20 * CENT, 80 * CENT, 600 * CENT)  # balance = available + held + reserve
    assert verify_store(app, "acme").ok
    app.close()


def test_the_periods_late_usage_still_draws_the_credit_set_aside_and_what_is_left_lapses_at_the_windows_end(
        tmp_path: Path) -> None:
    """Set aside by the paused renewal, November's 6.00 still pays the seats' close debit (3.00, read at Nov 25),
    which takes it from the reserve, not from what is available (no alert again); the sweep lapses the 3.00 left to
    breakage ``RECURRING_CREDIT_LATE_USAGE_DAYS`` after the period's end, once, which changes nothing available."""
    app = _with_alerts(tmp_path)
    _end_november(app, "paused_renewal")
    run(app, "credit.grant", "acme", grant_key="bought", unit="USD", amount="1.00")  # 1.00 available, 6.00 aside
    close_debit(app, "3.00", NOV_1, NOV_25)
    assert account(app).available("USD") == 100 * CENT  # the 1.00 bought; the close debit drew the reserve
    assert _wallet(app) == (400 * CENT, 100 * CENT, 0, 300 * CENT)
    assert account(app).overage_receivable("USD") == 0
    sweeper = Sweeper(app)
    sweeper.sweep(DEC_1 + LAPSES - timedelta(seconds=1))
    assert events(app, "GrantExpired") == []
    sweeper.sweep(DEC_1 + LAPSES)
    sweeper.sweep(DEC_1 + LAPSES + timedelta(hours=1))
    assert [e.remainder for e in events(app, "GrantExpired")] == [300 * CENT]
    assert _wallet(app) == (100 * CENT, 100 * CENT, 0, 0)
    assert len(events(app, "LowBalanceReached")) == 1 and len(events(app, "AutoTopUpRequested")) == 1
    assert verify_store(app, "acme").ok
    app.close()
