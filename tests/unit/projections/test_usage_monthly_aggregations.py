"""The monthly usage summary counts each meter by its aggregation, as the invoice does: a ``count`` meter one per event
whatever the event's quantity (a correction by the difference it made to the count, a void one less), across its
``group_by`` groups; a ``max``/``last``/``unique_count`` meter its close line's quantity. The real rating and ledger
wired by hand, the ledger's events projected by the real projection service (both the one-pass debit handler and the
read models' own handlers)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_projections import debits
from billing_runtime.bus import Record

from tests.unit.projections.test_usage_monthly_free_usage import day, ledger_records, monthly, pump
from tests.unit.subscriptions.test_cancel_after_period_end import DEC_1, NOV_1, Stack, wired_stack

U = 10**9  # ledger sub-units per unit
CENT = {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}
DOLLAR = {"model": "per_unit", "unit": "USD", "unit_amount": "1"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "requests", "aggregation": "count", "group_by": ["region"], "price": DOLLAR},
               {"code": "runs", "aggregation": "count", "price": CENT},
               {"code": "disk", "aggregation": "max", "price": DOLLAR},
               {"code": "seats", "aggregation": "last", "price": DOLLAR},
               {"code": "users", "aggregation": "unique_count", "value_property": "user", "price": DOLLAR}],
    "plans": [{"code": "p", "name": "P", "version": 1, "currency": "USD", "base_fee": "10.00",
               "charges": [{"meter": "requests", "included": "2", "price": DOLLAR},
                           {"meter": "runs", "price": CENT},
                           {"meter": "disk", "included": "10", "price": DOLLAR},
                           {"meter": "seats", "price": DOLLAR},
                           {"meter": "users", "included": "1", "price": DOLLAR}]}],
}


async def use(stack: Stack, events: list[tuple[str, str, str, int, str | None, dict[str, str]]]) -> None:
    """One batch of (id, meter, quantity, day of November, corrected event id or None, properties) through rating,
    then to the ledger."""
    records = []
    for event_id, meter, quantity, on, corrects, properties in events:
        event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=quantity, timestamp=day(on),
                           properties=properties, **({"correction_of": corrects} if corrects else {}))
        message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=day(on), source="test",
                                catalog_version=1)
        records.append(Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json()))
    await stack.rating.handle_accepted(records)
    await stack.deliver()


async def invoiced_and_recorded(tmp_path: Path) -> tuple[dict[str, tuple[str, Decimal]], list[Record]]:
    """(meter -> (quantity, amount) of the Dec 1 invoice's usage lines, the ledger's events)."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", NOV_1, key="m", plan="p")
        await pump(stack)
        eu, us = {"region": "eu"}, {"region": "us"}
        await use(stack, [("r1", "requests", "5", 2, None, eu), ("r2", "requests", "3", 3, None, us),
                          ("r3", "requests", "4", 4, None, eu), ("r4", "requests", "0", 5, None, us),
                          ("n1", "runs", "40", 2, None, {}), ("n2", "runs", "60", 3, None, {}),
                          ("d1", "disk", "7", 2, None, {}), ("d2", "disk", "12", 3, None, {}),
                          ("s1", "seats", "4", 2, None, {}), ("s2", "seats", "3", 4, None, {}),
                          ("u1", "users", "2", 2, None, {"user": "ann"}), ("u2", "users", "5", 3, None, {"user": "bob"}),
                          ("u3", "users", "1", 4, None, {"user": "ann"})])
        # r2 amended from 3 to 9: still one request (nothing more to count); r3 voided: one request less.
        await use(stack, [("c2", "requests", "9", 6, "r2", us), ("c3", "requests", "0", 6, "r3", eu),
                          ("cn", "runs", "45", 6, "n1", {})])
        stack.run("subscription.tick", DEC_1, key="m")
        await pump(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        invoice = stack.invoice(DEC_1.isoformat())
        lines: dict[str, tuple[str, Decimal]] = {}
        for item in invoice.lines:
            if item["kind"] == "usage":
                quantity, amount = lines.get(item["meter"], ("0", Decimal(0)))
                lines[item["meter"]] = (str(Decimal(quantity) + Decimal(item["quantity"])),
                                        amount + Decimal(item["amount"]))
        return lines, ledger_records(stack)


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass debits", "read models' own handlers"])
async def test_the_monthly_summary_counts_each_meter_by_its_aggregation_as_the_invoice_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_pass: bool) -> None:
    lines, records = await invoiced_and_recorded(tmp_path)
    # requests: 4 events (the quantities 5 + 3 + 4 + 0 are not what a count meter counts), r3 voided: 3, 2 included,
    # 1.00; runs: 2 events, the amendment counts none more: 0.02; disk: the max 12, 10 included: 2.00; seats: the
    # last reading 3: 3.00; users: ann and bob, 1 included: 1.00.
    assert lines == {"requests": ("3", Decimal("1.00")), "runs": ("2", Decimal("0.02")),
                     "disk": ("12", Decimal("2.00")), "seats": ("3", Decimal("3.00")),
                     "users": ("2", Decimal("1.00"))}
    if not one_pass:
        monkeypatch.setattr(debits, "handler_for", lambda event_type: None)
    summary = await monthly(records, tmp_path / "p.sqlite")
    # The count meters used to show the events' quantities: requests 5 + 3 + 4 + 0, + 6 amended, - 4 voided = 14,
    # runs 40 + 60 + 5 = 105.
    assert {meter: quantity for meter, (quantity, _, _) in summary.items()} == \
        {meter: quantity for meter, (quantity, _) in lines.items()}
    assert {meter: (cost, events) for meter, (_, cost, events) in summary.items()} == {
        "requests": (1 * U, 6), "runs": (U // 50, 3), "disk": (2 * U, 2), "seats": (3 * U, 2), "users": (U, 3)}
