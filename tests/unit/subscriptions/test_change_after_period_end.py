"""A change, pause or resume issued after the current period's end, before the scheduler's tick renewed it: the real
ledger and rating wired by hand (``test_cancel_after_period_end.Stack``). The command renews the periods due first,
as the tick would and as an immediate cancel does (``_renew_due``), so the customer is billed exactly what the tick
run on time at the period's end, then the same command, bills (the reference each test compares with)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_cancel_after_period_end import (
    DEC_1,
    JAN_1,
    NOV_1,
    Stack,
    usage_money,
    wired_stack,
)
from tests.unit.subscriptions.test_cancel_after_trial_end import owed, settle

NOV_25 = datetime(2026, 11, 25, tzinfo=UTC)
DEC_2, DEC_3, DEC_10 = (datetime(2026, 12, day, tzinfo=UTC) for day in (2, 3, 10))  # Dec 3: 29 of 31 days left
DEC_3_2027 = datetime(2027, 12, 3, tzinfo=UTC)
PER_CALL = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
PER_GB = {"model": "per_unit", "unit": "USD", "unit_amount": "0.50"}
CHARGES = [{"meter": "api_calls", "price": PER_CALL, "included": "100"}, {"meter": "storage_gb", "price": PER_GB}]
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "aggregation": "sum", "price": PER_CALL},
               {"code": "storage_gb", "aggregation": "max", "price": PER_GB}],  # priced when its period closes
    "plans": [
        {"code": "team", "name": "Team", "version": 1, "currency": "USD", "base_fee": "31.00", "charges": CHARGES},
        {"code": "basic", "name": "Basic", "version": 1, "currency": "USD", "base_fee": "15.50", "charges": CHARGES},
        {"code": "pro", "name": "Pro", "version": 1, "currency": "USD", "base_fee": "62.00",  # storage at 0.25
         "charges": [{"meter": "api_calls", "price": {**PER_CALL, "unit_amount": "0.05"}, "included": "1000"},
                     {"meter": "storage_gb", "price": {**PER_GB, "unit_amount": "0.25"}}]},
        {"code": "team-yearly", "name": "Team yearly", "version": 1, "currency": "USD", "base_fee": "310.00",
         "cadence": "year", "charges": CHARGES},
    ],
}


@contextlib.asynccontextmanager
async def november(tmp_path: Path, *, paused: bool = False) -> AsyncIterator[Stack]:
    """Team at 31.00 a month from Nov 1 (``paused`` on Nov 25), November's usage rated: 250 calls (100 included,
    15.00) and 10 GB (5.00 at the team plan's price, priced when rating closes November)."""
    async with wired_stack(tmp_path, CATALOG) as wired:
        wired.run("subscription.create", NOV_1, key="m", plan="team")
        await wired.relay()
        await wired.use("nov", "250", datetime(2026, 11, 20, tzinfo=UTC))
        await wired.use("disk", "10", datetime(2026, 11, 21, tzinfo=UTC), meter="storage_gb")
        if paused:
            wired.run("subscription.pause", NOV_25, key="m")
            await settle(wired)
        yield wired


async def december(stack: Stack, command: str, *, on_time: bool, until: datetime = JAN_1, **payload: Any) -> Any:
    """The Dec 1 tick run on time or not at all, 130 calls on Dec 2 (with the tick not run, rating rates them into
    the period after November's), ``command`` on Dec 3, then the late tick, 50 calls and 20 GB on Dec 10 and the
    renewal at ``until``; each step settled between rating and the ledger. Returns the command's result."""
    if on_time:
        stack.run("subscription.tick", DEC_1, key="m")
        await settle(stack)
    await stack.use("dec", "130", DEC_2)
    result = stack.run(command, DEC_3, key="m", **payload)
    await settle(stack)
    stack.run("subscription.tick", DEC_3, key="m")
    await settle(stack)
    await stack.use("dec-more", "50", DEC_10)
    await stack.use("dec-disk", "20", DEC_10, meter="storage_gb")
    stack.run("subscription.tick", until, key="m")
    await settle(stack)
    return result


def billed(stack: Stack) -> list[tuple[Any, ...]]:
    """What the customer got: every document (a change's key without its command id) with its status, period and
    lines, and what the account owes."""
    found = []
    for key, invoice in stack.invoices().items():
        name = key.partition("/")[2]
        found.append(("change" if name.startswith("change/") else name, invoice.status, invoice.period_start,
                      invoice.period_end, [(item["kind"], item.get("meter"), item["amount"]) for item in invoice.lines]))
    return [*sorted(found, key=repr), ("owed", owed(stack))]


async def reference(tmp_path: Path, command: str, *, paused: bool = False, until: datetime = JAN_1,
                    **payload: Any) -> list[tuple[Any, ...]]:
    """What the tick run on time at Dec 1, then ``command`` on Dec 3, bills."""
    async with november(tmp_path / "on-time", paused=paused) as stack:
        await december(stack, command, on_time=True, until=until, **payload)
        return billed(stack)


def fee_lines(stack: Stack, key: str) -> list[str]:
    return [item["amount"] for item in stack.invoice(key).lines if item["kind"] != "usage"]


@pytest.mark.parametrize(("payload", "prorated"), [
    ({"plan": "pro"}, ["-29.00", "58.00"]),
    ({"quantity": 2}, ["-29.00", "58.00"]),
    ({"plan": "basic"}, ["-29.00", "14.50"]),   # a downgrade: a credit note of 14.50
    ({"plan": "team-yearly"}, ["-29.00", "310.00"]),  # a cadence change: a new period from Dec 3
], ids=["upgrade", "quantity", "downgrade", "cadence"])
async def test_a_change_after_the_period_end_renews_first_and_prorates_the_period_it_falls_in(
        tmp_path: Path, payload: dict[str, Any], prorated: list[str]) -> None:
    """Nov 1 - Dec 1 at 31.00, the Dec 1 tick not run, a change on Dec 3. November ends first, as the tick would
    have ended it: the Dec 1 renewal bills December at the old plan (31.00) and November's usage, priced by the old
    plan (storage 5.00), then the change credits December's 29 unused days (29.00) and charges them at the new plan
    (a cadence change: a new year from Dec 3). Before, the change prorated nothing (November was over) and the late
    tick billed the new plan for all of December, the 2 days before the change too; a cadence change left Dec 1 -
    Dec 3 unbilled and November's usage uninvoiced until the new period's renewal; rating, told of the new plan
    before November ended, priced November's storage by it (2.50 on the pro plan)."""
    until = DEC_3_2027 if payload.get("plan") == "team-yearly" else JAN_1
    expected = await reference(tmp_path, "subscription.change", until=until, **payload)
    async with november(tmp_path / "late") as late:
        result = await december(late, "subscription.change", on_time=False, until=until, **payload)
        assert [item["amount"] for item in result.value["lines"]] == prorated
        renewal = late.invoice(DEC_1.isoformat())
        assert (renewal.status, renewal.period_start, renewal.period_end, fee_lines(late, DEC_1.isoformat()),
                usage_money(renewal)) == ("finalized", NOV_1, JAN_1, ["31.00"], Decimal("20.00"))
        # Every document, line and amount owed as with the tick on time: December's usage (130 calls on Dec 2,
        # rated into the period after November) billed once, at the renewal after December.
        assert billed(late) == expected


async def test_a_pause_after_the_period_end_lets_the_period_it_falls_in_run_billed(tmp_path: Path) -> None:
    """Paused on Dec 3, the Dec 1 tick not run: December began before the pause, so it is billed (31.00 on the Dec
    1 renewal, with November's usage) and the pause stops billing from January (a 0.00 fee with December's usage: 80 calls beyond the 100 included, 20 GB, 18.00).
    Before, the late tick found it paused and left December unbilled."""
    expected = await reference(tmp_path, "subscription.pause")
    async with november(tmp_path / "late") as late:
        await december(late, "subscription.pause", on_time=False)
        assert fee_lines(late, DEC_1.isoformat()) == ["31.00"]
        january = late.invoice(JAN_1.isoformat())
        assert (fee_lines(late, JAN_1.isoformat()), usage_money(january)) == (["0.00"], Decimal("18.00"))
        assert billed(late) == expected
        assert late.ledger.repository.get(subscription_id("acme", "m")).status == "paused"


async def test_a_resume_after_the_period_end_bills_only_the_rest_of_the_period_it_falls_in(tmp_path: Path) -> None:
    """Paused on Nov 25, resumed on Dec 3 with the Dec 1 tick not run: December began paused, so the Dec 1 renewal
    bills no fee (November's usage only) and the resume bills December's 29 days left (29.00). Before, the late tick
    found it active and billed all of December (31.00), the 2 paused days included."""
    expected = await reference(tmp_path, "subscription.resume", paused=True)
    async with november(tmp_path / "late", paused=True) as late:
        result = await december(late, "subscription.resume", on_time=False)
        assert [item["amount"] for item in result.value["lines"]] == ["29.00"]
        assert (fee_lines(late, DEC_1.isoformat()), usage_money(late.invoice(DEC_1.isoformat()))) == (
            ["0.00"], Decimal("20.00"))
        assert fee_lines(late, f"resume/{DEC_3.isoformat()}") == ["29.00"]
        assert billed(late) == expected


@pytest.mark.parametrize("kind", ["subscription.change", "subscription.pause"])
async def test_a_change_or_pause_after_the_end_of_a_period_set_to_cancel_there_is_refused(
        tmp_path: Path, kind: str) -> None:
    """Set to cancel at its period's end (Dec 1), the tick not run: on Dec 3 it has ended, nothing to change or
    pause. Refused, nothing changes (the renewal that ended it is rolled back too); the tick ends it as before."""
    async with november(tmp_path) as stack:
        stack.run("subscription.cancel", NOV_25, key="m")
        payload = {"at": DEC_3.isoformat(), "key": "m", **({"quantity": 2} if kind == "subscription.change" else {})}
        command = LedgerCommand(command_id=uuid4(), kind=kind, tenant="acme", issued_at=DEC_3, issued_by="user:test",
                                payload=payload)
        [refused] = stack.ledger.apply_commands([command])
        assert (refused.outcome, refused.reason) == ("rejected", "invalid_transition"), refused
        assert "canceled at its period's end" in (refused.detail or "")
        sub = stack.ledger.repository.get(subscription_id("acme", "m"))
        assert (sub.status, sub.quantity, sub.period_start) == ("active", 1, NOV_1)
        assert stack.run("subscription.tick", DEC_3, key="m").value["transition"] == "canceled_at_period_end"
