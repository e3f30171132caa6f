"""Late usage and late corrections of a closed period in which the plan changed: priced as real time priced the usage
of their time in that period (the plan in force then, and after the change what the usage before it was charged
counting as paid), never at the price of the period's end on its own."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tests.unit.rating.test_rating_service import (
    DEC,
    JAN,
    NOV,
    accepted,
    correction,
    end_period,
    published,
    rating,
    subscribe,
    subscription_event,
    usage_lines,
)
from tests.unit.rating.test_review_month_end_pricing import charged, publish

__all__ = ["rating"]
day = lambda d: datetime(2026, 11, d, tzinfo=UTC)

# Starter: every call 0.10. Growth: 100 calls included, then 0.05.
STARTER = {"code": "starter", "name": "Starter", "version": 1, "currency": "USD", "charges": [
    {"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}}]}
GROWTH = {"code": "growth", "name": "Growth", "version": 1, "currency": "USD", "charges": [
    {"meter": "api_calls", "included": "100", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.05"}}]}


async def upgrade_on_nov_16(service: Any, old: str = "starter", new: str = "growth") -> None:
    await subscription_event(service, "Changed", 4, plan={"code": new, "version": 1},
                             old_plan={"code": old, "version": 1}, quantity=1, at=day(16).isoformat(),
                             period_start=NOV.isoformat(), period_end=DEC.isoformat())


async def test_late_usage_of_a_period_with_an_upgrade_costs_what_the_period_costs_with_it_on_time(rating) -> None:  # type: ignore[no-untyped-def]
    """Starter from Nov 1: 100 calls on Nov 3 (10.00); an upgrade to Growth on Nov 16; 50 calls on Nov 20 (Growth
    prices the period's 150 calls 2.50, less than the 10.00 Starter charged: 0.00). November is invoiced 10.00. Then,
    in December: 100 calls of Nov 25 (Growth on 250 calls, 7.50, still below the 10.00: 0.00), 20 calls of Nov 5
    (Starter's time: 2.00) and Nov 20's 50 calls corrected to 150 (Growth on 370 calls, 13.50, less the 12.00 charged
    before the upgrade: 1.50). November costs 13.50 in all: Growth's price of its 370 calls, what it costs with every
    call on time. They were priced at Growth's price of the period's end alone: 5.00, 1.00 and 5.00, 21.00 in all."""
    service, bus = rating
    await publish(service, [STARTER, GROWTH])
    await subscribe(service, plan="starter")
    await service.handle_accepted([accepted("a1", "100", at=day(3))])
    await upgrade_on_nov_16(service)
    await service.handle_accepted([accepted("a2", "50", at=day(20))])
    await end_period(service, NOV, DEC, JAN, position=5)
    assert usage_lines(await published(bus))["api_calls"] == ("150", "10.000000000")
    await service.handle_accepted([accepted("a3", "100", at=day(25))])
    await service.handle_accepted([accepted("a4", "20", at=day(5))])
    await service.handle_accepted([correction("c2", "a2", "150")])
    commands = await published(bus)
    assert [charged(commands, e) for e in ("a3", "a4", "c2")] == [Decimal(0), Decimal(2), Decimal("1.50")]
    assert sum(charged(commands, e) for e in ("a1", "a2", "a3", "a4", "c2")) == Decimal("13.50")
    late = [c for c in commands if c["kind"] == "usage.debit" and c["payload"]["cause"]["event_ids"] == ["a4"]]
    assert [Decimal(c["payload"]["cause"]["price"]["unit_amount"]) for c in late] == [Decimal("0.10")]  # Nov 5's plan
    assert {c["payload"]["cause"]["original_period"] for c in late} == {NOV.isoformat()}


async def test_usage_on_each_side_of_a_plan_change_rated_in_one_batch_is_priced_as_in_two(rating) -> None:  # type: ignore[no-untyped-def]
    """Two plans with no allowance, 0.10 and 0.20 a call, changed on Nov 16. 10 calls of Nov 10 and 10 of Nov 20 in
    one batch: 1.00, then 0.20's price of the period's 20 calls less of its 10 (the 1.00 before the change paid
    towards it): 2.00. The second was priced from the first's charge at the old price (1.00, not 2.00): 3.00."""
    service, bus = rating
    cheap = {**STARTER, "code": "cheap", "name": "Cheap"}
    dear = {**STARTER, "code": "dear", "name": "Dear", "charges": [
        {"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.20"}}]}
    await publish(service, [cheap, dear])
    await subscribe(service, plan="cheap")
    await upgrade_on_nov_16(service, "cheap", "dear")
    await service.handle_accepted([accepted("e1", "10", at=day(10)), accepted("e2", "10", at=day(20))])
    commands = await published(bus)
    assert (charged(commands, "e1"), charged(commands, "e2")) == (Decimal(1), Decimal(2))
