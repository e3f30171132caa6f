"""An immediate cancel issued after a trial's end, before the scheduler's tick ended the trial: the real ledger and
the real rating service wired by hand (``test_cancel_after_period_end.Stack``), so the invoices show what a customer
is billed. Rating prices usage from the trial's end on by the plan, in the period the conversion starts; the cancel
ends the trial first as the tick would, so that usage is billed once, on the final invoice when it converts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events import ids
from billing_ledger.domain.subscription import subscription_id
from billing_rating.close import close_period

from tests.unit.subscriptions.test_cancel_after_period_end import Stack, usage_money, wired_stack

NOV_1, NOV_11, NOV_15 = (datetime(2026, 11, day, tzinfo=UTC) for day in (1, 11, 15))
DEC_11 = datetime(2026, 12, 11, tzinfo=UTC)
SUBUNITS = Decimal(10**9)  # ledger sub-units per USD
PER_CALL = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
PER_GB = {"model": "per_unit", "unit": "USD", "unit_amount": "0.50"}
CATALOG: dict[str, Any] = {  # a 10-day trial: Nov 1 - Nov 11; converted, the first period is Nov 11 - Dec 11
    "meters": [{"code": "api_calls", "aggregation": "sum", "price": PER_CALL},
               {"code": "storage_gb", "aggregation": "max", "price": PER_GB}],  # priced when its period closes
    "plans": [{"code": "team", "name": "Team", "version": 1, "currency": "USD", "base_fee": "31.00", "trial_days": 10,
               "charges": [{"meter": "api_calls", "price": PER_CALL, "included": "100"},
                           {"meter": "storage_gb", "price": PER_GB}]}],
}


@contextlib.asynccontextmanager
async def started(tmp_path: Path, *, payment_method: bool) -> AsyncIterator[Stack]:
    async with wired_stack(tmp_path, CATALOG) as wired:
        if payment_method:
            wired.run("payment_method.add", NOV_1, method_id="pm_1", gateway="stripe", label="visa", default=True)
        wired.run("subscription.create", NOV_1, key="m", plan="team")  # trialing until Nov 11
        await wired.relay()
        await wired.use("trial", "50", datetime(2026, 11, 5, tzinfo=UTC))  # in the trial: free
        # The tick for the trial's end (Nov 11) has not run: rating prices this usage by the plan, in Nov 11 - Dec 11.
        await wired.use("calls", "250", datetime(2026, 11, 12, tzinfo=UTC))  # 100 included: 150 x 0.10 = 15.00
        await wired.use("disk", "10", datetime(2026, 11, 13, tzinfo=UTC), meter="storage_gb")  # 10 x 0.50 = 5.00
        yield wired


async def settle(stack: Stack) -> None:
    """The cancel's events reach rating, its close debits and usage lines reach the ledger (twice: to the end)."""
    for _ in range(2):
        await stack.relay()
        await stack.deliver()
    assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results


def usage_lines(stack: Stack, key: str) -> dict[str, tuple[str, str, list[str]]]:
    return {item["meter"]: (item["quantity"], item["amount"], item["trace"]["event_ids"])
            for item in stack.invoice(key).lines if item["kind"] == "usage"}


async def test_a_cancel_after_the_trial_end_converts_it_first_and_bills_the_usage_since_on_the_final_invoice(
        converting: Stack) -> None:
    result = converting.run("subscription.cancel", NOV_15, key="m", immediately=True)
    await settle(converting)
    # As the tick would have: converted at the trial's end, its first invoice billing Nov 11 - Dec 11 in advance;
    # the cancel credits the unused 26 of its 30 days and its final invoice bills Nov 11 - Nov 15's usage, every
    # meter itemised with its events (it used to bill 15.00 as "Overage from earlier periods" on a final invoice
    # of the trial's period, and the storage, priced at close in a period never closed, not at all).
    first, final = converting.invoice(NOV_11.isoformat()), converting.invoice(NOV_15.isoformat())
    assert (first.status, first.period_start, first.period_end, first.total) == (
        "finalized", NOV_11, DEC_11, Decimal("31.00"))
    assert [item["amount"] for item in result.value["lines"]] == ["-26.87"]
    assert converting.invoice("cancel").total == Decimal("-26.87")
    assert (final.status, final.period_start, final.period_end) == ("finalized", NOV_11, NOV_15)
    assert usage_lines(converting, NOV_15.isoformat()) == {"api_calls": ("250", "15.00", ["calls"]),
                                                           "storage_gb": ("10", "5.00", ["disk"])}
    assert (usage_money(final), final.total) == (Decimal("20.00"), Decimal("20.00"))
    assert owed(converting) == Decimal("51.00")  # the 31.00 fee (26.87 back as account credit), 20.00 of usage
    sub = converting.ledger.repository.get(subscription_id("acme", "m"))
    assert (sub.status, sub.period_start) == ("canceled", NOV_11)


async def test_a_cancel_periods_after_the_trial_end_converts_renews_then_cuts_the_period_it_falls_in(
        converting: Stack) -> None:
    await converting.use("dec", "130", datetime(2026, 12, 15, tzinfo=UTC))  # after Dec 11: the second period
    converting.run("subscription.cancel", datetime(2026, 12, 21, tzinfo=UTC), key="m", immediately=True)
    await settle(converting)
    # Converted (Nov 11 - Dec 11), renewed on Dec 11 as the tick would, then cut on Dec 21: each period's usage
    # on its own invoice, once.
    renewal, final = converting.invoice(DEC_11.isoformat()), converting.invoice("2026-12-21T00:00:00+00:00")
    assert (renewal.status, renewal.period_start, usage_money(renewal)) == ("finalized", NOV_11, Decimal("20.00"))
    assert (final.status, final.period_start, usage_money(final)) == ("finalized", DEC_11, Decimal("3.00"))


async def test_a_late_tick_after_such_a_cancel_changes_nothing(converting: Stack) -> None:
    converting.run("subscription.cancel", NOV_15, key="m", immediately=True)
    assert converting.run("subscription.tick", NOV_15, key="m").value == {"transition": None}


async def test_without_a_payment_method_a_cancel_after_the_trial_end_ends_it_as_the_tick_would(
        unconverted: Stack) -> None:
    result = unconverted.run("subscription.cancel", NOV_15, key="m", immediately=True)
    await settle(unconverted)
    # The trial ended unconverted (reason trial_ended_without_payment_method) and the cancel had nothing left to
    # end: as after the tick, the usage since the trial's end is priced as for an account without the plan (the
    # calls at the list price, 250 x 0.10 with nothing included: 25.00, repriced from the plan's 15.00 since session
    # 14) and stays owed on the account; no invoice is drafted. It used to be cut as a trial: 15.00 billed on a final
    # invoice, the storage's 5.00 never priced.
    assert owed(unconverted) == Decimal("25.00")
    assert [key for key, i in unconverted.invoices().items() if i.status == "finalized"] == []
    # The storage is November's, an account without a subscription: priced when that month is closed, 10 x 0.50.
    await close_period(unconverted.rating.db, unconverted.bus, unconverted.rating.catalog, "2026-11")
    await unconverted.deliver()
    assert owed(unconverted) == Decimal("30.00")
    assert (result.value["status"], result.value["lines"]) == ("canceled", [])
    [ended] = [e for e in unconverted.ledger.events.get(subscription_id("acme", "m")) if type(e).__name__ == "Canceled"]
    assert ended.reason == "trial_ended_without_payment_method"


def owed(stack: Stack) -> Decimal:
    return Decimal(stack.ledger.repository.get(ids.account_id("acme")).receivable("USD")) / SUBUNITS
