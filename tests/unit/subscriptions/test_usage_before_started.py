"""Usage sent right after subscribing, rated before rating learns of the subscription (the review's ``billing run``
scenario: 500 calls of a 14-day trial charged 100.00 at the list price, billed on the renewal invoice as "Overage
from earlier periods"): the real ledger and the real rating service wired by hand
(``test_cancel_after_period_end.Stack``), each arrival order, so the invoices and balances show what a customer is
billed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events import ids, topics
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.relay import to_message
from billing_runtime.bus import Record

from tests.unit.subscriptions.test_cancel_after_period_end import Stack, wired_stack

NOV_1, NOV_15, DEC_15 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 15, tzinfo=UTC), datetime(
    2026, 12, 15, tzinfo=UTC)
SUBUNITS = Decimal(10**9)  # ledger sub-units per USD
CATALOG: dict[str, Any] = {  # a 14-day trial: Nov 1 - Nov 15; converted, the first period is Nov 15 - Dec 15
    "meters": [{"code": "api_calls", "aggregation": "sum",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.20"}},
               {"code": "storage_gb", "aggregation": "max",
                "price": {"model": "per_unit", "unit": "USD", "unit_amount": "1.00"}}],
    "plans": [{"code": "hybrid", "name": "Hybrid", "version": 1, "currency": "USD", "base_fee": "50.00",
               "trial_days": 14, "charges": [
                   {"meter": "api_calls", "included": "100",
                    "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
                   {"meter": "storage_gb", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.50"}}]},
              {"code": "basic", "name": "Basic", "version": 1, "currency": "USD", "base_fee": "10.00",
               "charges": []}],
}


async def settle(stack: Stack) -> None:
    for _ in range(2):
        await stack.relay()
        await stack.deliver()
    assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results


def billed(stack: Stack) -> dict[str, Any]:
    """Every finalized document (its lines and total), what the account owes and its available balance."""
    account = stack.ledger.repository.get(ids.account_id("acme"))
    return {"documents": {key: ([(item["kind"], item["description"], item["amount"]) for item in invoice.lines],
                                invoice.total)
                          for key, invoice in sorted(stack.invoices().items()) if invoice.status == "finalized"},
            "owed": Decimal(account.receivable("USD")) / SUBUNITS,
            "available": Decimal(account.available("USD")) / SUBUNITS}


async def trial_then_renewal(tmp_path: Path, *, usage_first: bool) -> dict[str, Any]:
    async with wired_stack(tmp_path, CATALOG) as stack:
        await stack.relay()  # the catalogue and the account reach rating
        stack.run("payment_method.add", NOV_1, method_id="pm_1", gateway="stripe", label="visa", default=True)
        stack.run("subscription.create", NOV_1, key="m", plan="hybrid")  # trialing until Nov 15
        if not usage_first:
            await stack.relay()
        await stack.use("t-r1", "500", datetime(2026, 11, 5, 10, tzinfo=UTC))  # the trial's: free
        await stack.use("t-d1", "30", datetime(2026, 11, 6, tzinfo=UTC), meter="storage_gb")
        await settle(stack)  # rating learns of the trial now (usage first), or learnt of it before
        stack.run("subscription.tick", NOV_15, key="m")  # converted: Nov 15 - Dec 15, 50.00 in advance
        await settle(stack)
        await stack.use("t-r2", "250", datetime(2026, 11, 20, tzinfo=UTC))  # 100 included: 150 x 0.10 = 15.00
        stack.run("subscription.tick", DEC_15, key="m")  # renewed: the period's usage on its invoice
        await settle(stack)
        return billed(stack)


async def test_trial_usage_rated_before_rating_learns_of_the_trial_is_billed_as_if_it_knew(tmp_path: Path) -> None:
    known_first = await trial_then_renewal(tmp_path / "known", usage_first=False)
    usage_first = await trial_then_renewal(tmp_path / "usage", usage_first=True)
    assert usage_first == known_first
    renewal_lines, renewal_total = known_first["documents"][f"{subscription_id('acme', 'm')}/{DEC_15.isoformat()}"]
    # The renewal bills December in advance and November's usage after the trial, nothing of the trial (it billed
    # "Overage from earlier periods 100.00" for the trial's 500 calls and 30.00 of storage priced at the list price).
    assert [line for line in renewal_lines if line[0] == "usage"] == [
        ("usage", "api_calls: 250 unit", "15.00")]
    assert not any("earlier periods" in line[1] for line in renewal_lines)
    assert renewal_total == Decimal("65.00")
    assert known_first["owed"] == Decimal("115.00")  # the first invoice's 50.00 and the renewal's 65.00, unpaid


async def relay_holding_back(stack: Stack, subscription: Any) -> list[Record]:
    """``stack.relay`` but for ``subscription``'s events, returned instead (its partition lags behind the others')."""
    records, held = [], []
    for notification in stack.ledger.process_recorder.select_notifications(stack.relayed + 1, 1000):
        message = to_message(stack.ledger, notification)
        record = Record(topics.LEDGER_EVENTS, 0, notification.id, message.key.encode(), message.value,
                        message.headers)
        (held if notification.originator_id == subscription else records).append(record)
        stack.relayed = notification.id
    await stack.rating.handle_ledger_events(records)
    return held


async def two_subscriptions(tmp_path: Path, *, usage_first: bool) -> dict[str, Any]:
    """Basic (no metered charge) from Nov 1, then Hybrid, started earlier (Oct 20, no trial): the account's primary
    subscription, whose plan prices the calls. Usage first: rating learns of Hybrid only after Basic's renewal."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", NOV_1, key="b", plan="basic")  # Nov 1 - Dec 1, 10.00 in advance
        await stack.relay()
        stack.run("subscription.create", datetime(2026, 10, 20, tzinfo=UTC), key="m", plan="hybrid", trial=False)
        held = await relay_holding_back(stack, subscription_id("acme", "m")) if usage_first else []
        if not usage_first:
            await stack.relay()
        await stack.use("b-r1", "300", datetime(2026, 11, 5, tzinfo=UTC))
        stack.run("subscription.tick", datetime(2026, 12, 1, tzinfo=UTC), key="b")  # Basic renews
        held += await relay_holding_back(stack, subscription_id("acme", "m")) if usage_first else []
        await stack.deliver()
        basic = stack.invoices()[f"{subscription_id('acme', 'b')}/2026-12-01T00:00:00+00:00"]
        billed_early = [(item["kind"], item["amount"]) for item in basic.lines if item["kind"] == "usage"]
        await stack.rating.handle_ledger_events(held)  # rating learns of Hybrid now (or learnt of it before)
        await settle(stack)
        stack.run("subscription.tick", datetime(2026, 12, 1, tzinfo=UTC), key="m")  # Hybrid renews (Nov 20)
        await settle(stack)
        return {**billed(stack), "billed_early": billed_early}


async def test_usage_an_invoice_billed_before_rating_learnt_of_the_subscription_is_credited_and_billed_by_it(
        tmp_path: Path) -> None:
    known_first = await two_subscriptions(tmp_path / "known", usage_first=False)
    usage_first = await two_subscriptions(tmp_path / "usage", usage_first=True)
    hybrid_renewal = f"{subscription_id('acme', 'm')}/2026-11-20T00:00:00+00:00"
    # Rating knowing Hybrid: its renewal bills the 300 calls at its price, 100 included, 200 x 0.10.
    assert known_first["billed_early"] == []
    assert known_first["documents"][hybrid_renewal][0][-1] == ("usage", "api_calls: 300 unit", "20.00")
    # Not knowing it yet: Basic's renewal billed them at the list price, 60.00. Learning of Hybrid, rating gives them
    # back as a late correction of that period: the ledger credits that invoice by a credit note; Hybrid's renewal
    # bills them as above. What the customer owes less the credit they hold is the same either way.
    assert usage_first["billed_early"] == [("usage", "60.00")]
    [note] = [lines for key, (lines, total) in usage_first["documents"].items() if total < 0]
    assert [(kind, amount) for kind, _, amount in note] == [("usage_correction", "-60.00")]
    assert usage_first["documents"][hybrid_renewal] == known_first["documents"][hybrid_renewal]
    assert usage_first["owed"] - usage_first["available"] == known_first["owed"] - known_first["available"]
