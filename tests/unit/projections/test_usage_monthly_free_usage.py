"""The monthly usage summary counts usage that cost nothing (an allowance, a flat fee, a stairstep band, a max meter
within its allowance, a trial): the real rating and ledger wired by hand (``wired_stack``), the ledger's events
projected by the real projection service; its quantities are the invoice's, its costs what was charged."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, UsageEvent
from billing_ledger.relay import to_message
from billing_runtime.bus import Record

from tests.unit.projections.conftest import apply, dumps_by_batching, sqlite_service
from tests.unit.subscriptions.test_cancel_after_period_end import DEC_1, NOV_1, Stack, wired_stack

U = 10**9  # ledger sub-units per unit
USD = {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}
JOBS = {"model": "flat", "unit": "USD", "amount": "5"}
SEATS = {"model": "stairstep", "unit": "USD", "steps": [{"up_to": "10", "amount": "10"}, {"up_to": None, "amount": "20"}]}
DISK = {"model": "per_unit", "unit": "USD", "unit_amount": "1"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": USD}, {"code": "jobs", "price": JOBS},
               {"code": "seats", "price": SEATS}, {"code": "disk", "aggregation": "max", "price": DISK}],
    "plans": [{"code": "p", "name": "P", "version": 1, "currency": "USD", "base_fee": "10.00",
               "charges": [{"meter": "api_calls", "included": "1000", "price": USD}, {"meter": "jobs", "price": JOBS},
                           {"meter": "seats", "price": SEATS},
                           {"meter": "disk", "included": "10", "price": DISK}]}],
}


def day(d: int) -> datetime:
    return datetime(2026, 11, d, 12, tzinfo=UTC)


async def use(stack: Stack, events: list[tuple[str, str, str, datetime, str | None]]) -> None:
    """One batch of (id, meter, quantity, time, corrected event id or None) through rating, then to the ledger."""
    records = []
    for event_id, meter, quantity, at, corrects in events:
        event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=quantity, timestamp=at,
                           **({"correction_of": corrects} if corrects else {}))
        message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=at, source="test",
                                catalog_version=1)
        records.append(Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json()))
    await stack.rating.handle_accepted(records)
    await stack.deliver()


async def pump(stack: Stack, rounds: int = 4) -> None:
    for _ in range(rounds):
        await stack.relay()
        await stack.deliver()


def ledger_records(stack: Stack) -> list[Record]:
    records = []
    for notification in stack.ledger.process_recorder.select_notifications(1, 100_000):
        message = to_message(stack.ledger, notification)
        records.append(Record(topics.LEDGER_EVENTS, 0, notification.id, message.key.encode(), message.value,
                              message.headers))
    return records


async def monthly(records: list[Record], path: Path) -> dict[str, tuple[str, int, int]]:
    """meter -> (quantity, cost in sub-units, events) of acme's November."""
    async with sqlite_service(path) as service:
        await apply(service, records)
        rows = await service.db.fetch("SELECT meter, quantity, cost, events FROM usage_monthly "
                                      "WHERE tenant = 'acme' AND period = '2026-11'")
    return {r["meter"]: (str(Decimal(r["quantity"])), int(r["cost"]), int(r["events"])) for r in rows}


async def test_the_monthly_summary_shows_the_quantity_invoiced_including_usage_that_cost_nothing(
        tmp_path: Path) -> None:
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", NOV_1, key="m", plan="p")
        await pump(stack)
        await use(stack, [("a1", "api_calls", "800", day(2), None), ("a2", "api_calls", "300", day(3), None),
                          ("j1", "jobs", "1", day(2), None), ("j2", "jobs", "4", day(3), None),
                          ("s1", "seats", "3", day(2), None), ("s2", "seats", "3", day(3), None),
                          ("d1", "disk", "7", day(2), None), ("d2", "disk", "9", day(3), None)])
        stack.run("subscription.tick", DEC_1, key="m")
        await pump(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        invoice = stack.invoice(DEC_1.isoformat())
        lines = {item["meter"]: (item["quantity"], Decimal(item["amount"])) for item in invoice.lines
                 if item["kind"] == "usage"}
        assert lines == {"api_calls": ("1100", Decimal("1.00")), "jobs": ("5", Decimal("5.00")),
                         "seats": ("6", Decimal("10.00")), "disk": ("9", Decimal("0.00"))}
        # The free debits move nothing: no postings, so every balance is what the charged usage made it.
        account = stack.ledger.repository.get(ids.account_id("acme"))
        debits = [e for e in stack.ledger.events.get(account.id) if type(e).__name__ == "UsageDebited"]
        assert all(e.postings == [] for e in debits if e.amount == 0)
        assert sum(e.amount for e in debits) == 16 * U
        records = ledger_records(stack)
    summary = await monthly(records, tmp_path / "p.sqlite")
    # Used to be api_calls 300 (the 800 within the allowance cost nothing), jobs 1, seats 3, no disk row.
    assert summary == {"api_calls": ("1100", 1 * U, 2), "jobs": ("5", 5 * U, 2), "seats": ("6", 10 * U, 2),
                       "disk": ("9", 0, 2)}
    assert {meter: quantity for meter, (quantity, _, _) in summary.items()} == \
        {meter: quantity for meter, (quantity, _) in lines.items()}
    # Replayed in any batching, the same rows.
    one, everything, random_slices = await dumps_by_batching(records, tmp_path, seed=9, size_max=7, replay_all=True)
    assert one == everything == random_slices


async def test_a_correction_within_the_allowance_and_trial_usage_count_at_no_cost(tmp_path: Path) -> None:
    trial_catalog = {**CATALOG, "plans": [{**CATALOG["plans"][0], "code": "t", "trial_days": 14}]}
    async with wired_stack(tmp_path, trial_catalog) as stack:
        stack.run("subscription.create", NOV_1, key="m", plan="t")
        await pump(stack)
        await use(stack, [("t1", "api_calls", "5000", day(3), None)])  # in the trial: free
        await use(stack, [("t2", "api_calls", "500", day(4), None)])
        await use(stack, [("c1", "api_calls", "700", day(5), "t2")])  # 500 amended to 700: 200 more, still free
        account = stack.ledger.repository.get(ids.account_id("acme"))
        debits = [e for e in stack.ledger.events.get(account.id) if type(e).__name__ == "UsageDebited"]
        assert [(e.amount, e.postings) for e in debits] == [(0, []), (0, []), (0, [])]
        records = ledger_records(stack)
    assert await monthly(records, tmp_path / "p.sqlite") == {"api_calls": ("5700", 0, 3)}


async def test_the_history_lists_what_usage_charged_and_leaves_out_usage_that_cost_nothing(tmp_path: Path) -> None:
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", NOV_1, key="m", plan="p")
        await pump(stack)
        # 800 within the allowance (free), then 300 of which 100 beyond it (1.00)
        await use(stack, [("a1", "api_calls", "800", day(2), None), ("a2", "api_calls", "300", day(3), None)])
        await pump(stack)
        records = ledger_records(stack)
    async with sqlite_service(tmp_path / "p.sqlite") as service:
        await apply(service, records)
        usage = await service.db.fetch("SELECT amount, quantity, event_ids FROM transactions "
                                       "WHERE tenant = 'acme' AND type = 'usage' ORDER BY position")
        summary = await service.db.fetch("SELECT quantity FROM usage_monthly WHERE tenant = 'acme'")
    # A free tier's every call used to be a history row of 0.00 ("Usage", nothing moved).
    assert [(int(r["amount"]), r["quantity"], r["event_ids"]) for r in usage] == [(-1 * U, "300", '["a2"]')]
    assert [str(Decimal(r["quantity"])) for r in summary] == ["1100"]  # the summary still counts the free 800


async def test_usage_after_a_refused_debit_is_summed_at_the_price_of_the_usage_billed(tmp_path: Path) -> None:
    """A stairstep meter under ``block`` (10 documents: 10.00), no credit: 10 documents refused, 10 more rated before
    rating reads the refusal (priced 0 as documents 11-20). Rating's refusal adjustment bills the 10.00 once; the
    month shows the 10 documents billed, 10.00, one event (it showed 10 documents costing 0.00)."""
    steps = {"model": "stairstep", "unit": "USD", "steps": [{"up_to": "100", "amount": "10"},
                                                           {"up_to": None, "amount": "20"}]}
    catalog = {"meters": [{"code": "documents", "price": steps, "overage_policy": "block"}]}
    async with wired_stack(tmp_path, catalog) as stack:
        await pump(stack)  # the catalogue reaches rating
        await use(stack, [("d1", "documents", "10", day(2), None)])  # refused: no credit
        await use(stack, [("d2", "documents", "10", day(3), None)])  # rated before rating read the refusal
        await pump(stack)
        account = stack.ledger.repository.get(ids.account_id("acme"))
        debits = [e for e in stack.ledger.events.get(account.id) if type(e).__name__ == "UsageDebited"]
        assert sum(e.amount for e in debits) == 10 * U
        records = ledger_records(stack)
    assert await monthly(records, tmp_path / "p.sqlite") == {"documents": ("10", 10 * U, 1)}
    one, everything, random_slices = await dumps_by_batching(records, tmp_path, seed=3, size_max=5, replay_all=True)
    assert one == everything == random_slices
