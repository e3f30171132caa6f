"""Usage that rating rates before it learns of the subscription event that prices it (``Started``, ``Changed``) is
repriced when it does, so both arrival orders end with the same charges, running totals, invoice usage lines and
monthly usage (docs/rating.md "Usage rated before its subscription"). So is usage after a ``Canceled`` rated before
it; a ``Paused`` or ``Resumed`` prices nothing otherwise."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_rating import repricing
from billing_rating.close import close_period
from billing_rating.service import RatingService
from billing_runtime.bus import EmbeddedBus, Record

from tests.unit.rating.support import embedded_rating
from tests.unit.rating.test_rating_service import (
    BASIC,
    CATALOG,
    TEAM,
    accepted,
    correction,
    end_period,
    published,
    subscribe,
    subscription_event,
    usage_lines,
)

NOV_2, DEC_2, JAN_2 = datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC), datetime(2027, 1, 2, tzinfo=UTC)
day = lambda d: datetime(2026, 11, d, tzinfo=UTC)

# Before the subscription (Nov 1): list price, calendar month; from Nov 2 on: the Team plan, its period Nov 2 - Dec 2.
USAGE = [accepted("before", "30", at=day(1)),                      # list price: 2 included, 10 x 1.00 + 18 x 0.50
         accepted("a1", "150", at=day(3)), accepted("a2", "80", at=day(10)),  # Team: 100 included, 130 x 0.10
         accepted("s1", "40", "storage_gb", at=day(5)),            # at close: (40 - 10) x 0.50
         accepted("l1", "7", "logins", at=day(4)), accepted("l2", "1", "logins", at=day(6)),  # 2 logins, 1 included
         accepted("g1", "1000", "ai_tokens", at=day(7), model="small", input_tokens=1000)]  # its own table, any plan


async def catalogue(service: RatingService) -> None:
    event = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2, type="Catalog.Published",
                        recorded_at=NOV_2, data={"version": 2, "document": {**CATALOG, "plans": [TEAM, BASIC]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 1, None, event.to_json())])


async def debits(bus: EmbeddedBus) -> dict[str, dict[str, Any]]:
    """The usage debits by command id: each once, as the ledger posts them."""
    return {c["command_id"]: c["payload"] for c in await published(bus) if c["kind"] == "usage.debit"}


async def outcome(service: RatingService, bus: EmbeddedBus) -> dict[str, Any]:
    """What a customer is billed and shown: net charge per event, running totals, usage per (meter, month) as the
    monthly summary adds it (``contribution``), and the usage lines of the renewal invoice."""
    per_event: dict[str, int] = {}
    monthly: dict[tuple[str, str], Decimal] = {}
    for payload in (await debits(bus)).values():
        cause = payload["cause"]
        event = cause.get("corrects") or cause["event_ids"][0]
        per_event[event] = per_event.get(event, 0) + int(payload["amount_subunits"])
        key = (payload["meter"], payload["at"][:7])
        monthly[key] = monthly.get(key, Decimal(0)) + Decimal(cause.get("contribution") or cause["quantity"])
    totals = {(r["meter"], r["period"]): r["quantity"] for r in await service.db.fetch(
        "SELECT meter, period, quantity FROM period_totals") if Decimal(r["quantity"])}
    commands = await published(bus)
    lines = usage_lines(commands) if any(c["kind"] == "invoice.usage_lines" for c in commands) else {}
    return {"per_event": per_event, "monthly": monthly, "totals": totals, "lines": lines}


async def both_orders(tmp_path: Path, learn: Callable[[RatingService], Awaitable[None]],
                      then: Callable[[RatingService], Awaitable[None]], usage: list[Record] = USAGE
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The outcome with the subscription events first (as rating was built for), then with the usage first."""
    results = []
    for usage_first in (False, True):
        async with embedded_rating(tmp_path / str(usage_first)) as (service, bus):
            await catalogue(service)
            if usage_first:
                await service.handle_accepted(usage)
                await learn(service)
            else:
                await learn(service)
                await service.handle_accepted(usage)
            await then(service)
            results.append(await outcome(service, bus))
    return results[0], results[1]


async def start_team(service: RatingService) -> None:
    await subscribe(service, started=NOV_2, period=(NOV_2, DEC_2))


async def test_usage_rated_before_the_subscription_started_ends_as_if_rated_after(tmp_path: Path) -> None:
    async def correct_and_renew(service: RatingService) -> None:
        await service.handle_accepted([correction("a1-fix", "a1", "120")])  # in the period a1 counts in now
        await end_period(service, NOV_2, DEC_2, JAN_2, position=4)

    known_first, usage_first = await both_orders(tmp_path, start_team, correct_and_renew)
    assert usage_first == known_first
    assert known_first["per_event"] == {
        "before": 19_000_000_000,                          # list price, November (calendar month)
        "a1": 2_000_000_000, "a2": 8_000_000_000,          # 120 + 80 calls, 100 included: 10.00 in all
        "l1": 0, "l2": 1_000_000_000, "s1": 15_000_000_000, "g1": 150_000}
    assert known_first["lines"] == {"api_calls": ("200", "10.000000000"), "logins": ("2", "1.000000000"),
                                    "storage_gb": ("40", "15.000000000"), "ai_tokens": ("1000", "0.000150000")}


async def test_a_redelivered_started_sends_the_same_commands_and_reprices_nothing_again(tmp_path: Path) -> None:
    async with embedded_rating(tmp_path) as (service, bus):
        await catalogue(service)
        await service.handle_accepted(USAGE)
        await start_team(service)
        sent = await published(bus)
        rows = await service.db.fetchval("SELECT count(*) FROM rated_events")
        await start_team(service)  # the same Started again (a restart before the offsets were committed)
        again = (await published(bus))[len(sent):]
        repriced = [c for c in sent if c["kind"] == "usage.debit" and c["payload"]["cause"].get("repriced")]
        assert repriced and [c["command_id"] for c in again] == [c["command_id"] for c in sent[-len(again):]]
        assert {c["command_id"] for c in repriced} <= {c["command_id"] for c in again}
        assert await service.db.fetchval("SELECT count(*) FROM rated_events") == rows
        # a1's 150 calls at the list price (after "before"'s 30: 150 x 0.50 = 75.00) given back in November, then
        # charged by Team in its period (100 included: 5.00); the give-back names the event and the repricing.
        a1 = [c["payload"] for c in repriced if c["payload"]["cause"]["corrects"] == "a1"]
        assert [(p["amount"], p["cause"]["period"], p["cause"]["contribution"], p["cause"]["repriced"]["as"])
                for p in a1] == [("-75.000000000", "2026-11", "-150", "give_back"),
                                 ("5.000000000", NOV_2.isoformat(), "150", "charge")]
        assert a1[0]["cause"]["event_ids"] == ["a1"] and a1[0]["cause"]["priced_by"] == "list_price"


async def test_trial_usage_rated_before_the_trial_started_is_free_and_its_storage_closed_by_the_trial(
        tmp_path: Path) -> None:
    async def start_trial(service: RatingService) -> None:
        await subscribe(service, status="trialing", started=NOV_2, period=(NOV_2, DEC_2),
                        trial_end=DEC_2.isoformat())

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=4)

    known_first, usage_first = await both_orders(tmp_path, start_trial, renew)
    assert usage_first == known_first
    assert {event: amount for event, amount in known_first["per_event"].items() if amount} == {
        "before": 19_000_000_000, "g1": 150_000}  # AI tokens are priced by the meter's own table, trial or not
    # November (calendar month) closed over HTTP bills only the usage before the trial (it used to bill the storage
    # at its list price, 40 x 0.10 = 4.00, and count every call of the trial at the list price).
    async with embedded_rating(tmp_path / "close") as (service, bus):
        await catalogue(service)
        await service.handle_accepted(USAGE)
        await start_trial(service)
        sent = len(await published(bus))
        november = {line.meter: (line.quantity, line.amount, line.event_ids)
                    for line in await close_period(service.db, bus, service.catalog, "2026-11")}
        assert november == {"api_calls": ("30", "19.000000000", ["before"]), "storage_gb": ("0", "0.000000000", []),
                            "ai_tokens": ("0", "0.000000000", []), "logins": ("0", "0.000000000", [])}
        assert (await published(bus))[sent:] == []  # no close debit: nothing of it is billed there


async def test_usage_rated_before_a_plan_change_is_priced_by_the_new_plan(tmp_path: Path) -> None:
    at = datetime(2026, 11, 2, 12, tzinfo=UTC)  # before every event of the period

    async def change_to_basic(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, "Changed", 4, old_plan={"code": "team", "version": 1},
                                 plan={"code": "basic", "version": 1}, old_quantity=1, quantity=1, at=at.isoformat(),
                                 by="user:test", lines=[], period_start=NOV_2.isoformat(),
                                 period_end=DEC_2.isoformat(), anchor_day=2)

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=5)

    known_first, usage_first = await both_orders(tmp_path, change_to_basic, renew)
    assert usage_first == known_first
    # Basic charges nothing for calls: the list price on the period's total (2 included, 10 x 1.00, then 0.50).
    assert (known_first["per_event"]["a1"], known_first["per_event"]["a2"]) == (79_000_000_000, 40_000_000_000)


def changed(plan: str, old_plan: str, at: datetime, position: int) -> dict[str, Any]:
    return {"kind": "Changed", "position": position, "old_plan": {"code": old_plan, "version": 1},
            "plan": {"code": plan, "version": 1}, "old_quantity": 1, "quantity": 1, "at": at.isoformat(),
            "by": "user:test", "lines": [], "period_start": NOV_2.isoformat(), "period_end": DEC_2.isoformat(),
            "anchor_day": 2}


async def test_usage_before_a_plan_change_is_priced_by_the_old_plan_whenever_it_reaches_rating(tmp_path: Path) -> None:
    async def change_on_nov_8(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, **changed("basic", "team", day(8), 4))

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=5)

    known_first, usage_first = await both_orders(tmp_path, change_on_nov_8, renew)
    assert usage_first == known_first
    # a1 (Nov 3) by Team, the plan of its time: 100 included, 50 x 0.10 (rating used to price it by Basic, the plan
    # it had when the usage arrived: the list price, 79.00); a2 (Nov 10) by Basic: the list price from 150 to 230.
    assert (known_first["per_event"]["a1"], known_first["per_event"]["a2"]) == (5_000_000_000, 40_000_000_000)
    assert known_first["per_event"]["l2"] == 1_000_000_000  # Team's logins: 2, 1 included


async def test_usage_before_two_plan_changes_at_one_instant_is_priced_by_the_plan_held_before_them(
        tmp_path: Path) -> None:
    """Team to Basic and back at the same instant (Nov 8), in that order: usage before it is Team's, whenever it
    reaches rating (it was priced by Basic, held for no time at all: the plans remembered were sorted by code)."""
    async def there_and_back_on_nov_8(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, **changed("basic", "team", day(8), 4))
        await subscription_event(service, **changed("team", "basic", day(8), 5))

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=6)

    known_first, usage_first = await both_orders(tmp_path, there_and_back_on_nov_8, renew)
    assert usage_first == known_first
    # a1 (Nov 3) and a2 (Nov 10) by Team, the plan before and after Nov 8: 100 included, then 0.10 a call.
    assert (known_first["per_event"]["a1"], known_first["per_event"]["a2"]) == (5_000_000_000, 8_000_000_000)


async def test_the_plans_a_subscription_had_are_remembered_for_the_usage_window_only(tmp_path: Path) -> None:
    async with embedded_rating(tmp_path) as (service, bus):
        await catalogue(service)
        await start_team(service)
        await subscription_event(service, **changed("basic", "team", day(8), 4))
        # 51 days later (beyond the 35 days usage may be late, and a week's lag): Team from Nov 8 is forgotten.
        await subscription_event(service, **changed("team", "basic", datetime(2026, 12, 29, tzinfo=UTC), 5))
        history = await service.db.fetchval("SELECT history FROM subscription_plans")
        assert json.loads(history) == [["2026-12-29T00:00:00+00:00", "basic", 1]]
        # Usage of Dec 20 reaching rating now is priced by Basic, the plan of its time (list price: 2 included).
        await service.handle_accepted([accepted("d1", "12", at=datetime(2026, 12, 20, tzinfo=UTC))])
        [*_, debit] = [c for c in await published(bus) if c["kind"] == "usage.debit"]
        assert (debit["payload"]["cause"]["priced_by"], debit["payload"]["amount"]) == ("list_price", "10.000000000")


async def test_a_give_back_of_a_closed_month_is_a_late_correction_of_it(tmp_path: Path) -> None:
    async with embedded_rating(tmp_path) as (service, bus):
        await catalogue(service)
        await service.handle_accepted([accepted("o1", "12", at=datetime(2026, 10, 25, tzinfo=UTC))])
        await close_period(service.db, bus, service.catalog, "2026-10")  # billed at the list price: 10.00
        # The subscription started on Oct 20 (its period Oct 20 - Nov 20); rating learns of it after the close.
        start, end = datetime(2026, 10, 20, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC)
        await subscribe(service, started=start, period=(start, end))
        back, charge = [p for p in (await debits(bus)).values() if p["cause"].get("repriced")]
        assert (back["amount"], back["cause"]["period"], back["cause"]["original_period"], back["cause"]["late"]) == (
            "-10.000000000", "2026-10", "2026-10", "late")
        assert (charge["amount"], charge["cause"]["period"]) == ("0.000000000", start.isoformat())  # 100 included
        rows = await service.db.fetch("SELECT period, decision, corrects FROM rated_events ORDER BY rated_at")
        assert [(r["period"], r["decision"], r["corrects"]) for r in rows] == [
            ("2026-10", "priced", None), ("2026-10", "late:priced", "o1"), (start.isoformat(), "priced", "o1")]


async def test_usage_of_a_period_closed_before_the_subscription_event_keeps_its_price(tmp_path: Path) -> None:
    async with embedded_rating(tmp_path) as (service, bus):
        await catalogue(service)
        await start_team(service)
        await service.handle_accepted([accepted("a1", "150", at=day(3))])
        await end_period(service, NOV_2, DEC_2, JAN_2, position=4)  # invoiced: 5.00
        sent = len(await published(bus))
        await subscription_event(service, "Changed", 5, old_plan={"code": "team", "version": 1},
                                 plan={"code": "basic", "version": 1}, old_quantity=1, quantity=1,
                                 at=day(3).isoformat(), by="user:test", lines=[], period_start=DEC_2.isoformat(),
                                 period_end=JAN_2.isoformat(), anchor_day=2)
        assert (await published(bus))[sent:] == []  # its invoice stands


async def test_usage_rated_before_an_activation_is_priced_by_the_plan_from_the_activation(tmp_path: Path) -> None:
    async def start_then_activate(service: RatingService) -> None:
        await subscribe(service, status="incomplete", started=NOV_2, period=(NOV_2, DEC_2))  # not live: list price
        await subscription_event(service, "Activated", 4, at=NOV_2.isoformat(), by="system:payment",
                                 period_start=NOV_2.isoformat(), period_end=DEC_2.isoformat(), anchor_day=2)

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=5)

    known_first, usage_first = await both_orders(tmp_path, start_then_activate, renew)
    assert usage_first == known_first
    assert (known_first["per_event"]["a1"], known_first["per_event"]["a2"]) == (5_000_000_000, 8_000_000_000)


# -- a cancel (immediate, at period end, a trial's unconverted end) or a pause learnt after usage it prices ---------

# After Nov 6 noon: calls, storage (at close), logins, AI tokens.
AFTER_NOV_6 = [accepted("a2", "80", at=day(10)), accepted("s2", "40", "storage_gb", at=day(12)),
               accepted("l2", "1", "logins", at=day(8)), accepted("l3", "1", "logins", at=day(11)),
               accepted("g1", "1000", "ai_tokens", at=day(9), model="small", input_tokens=1000)]


async def close_november(service: RatingService) -> None:
    await close_period(service.db, service.bus, service.catalog, "2026-11")  # type: ignore[arg-type]


async def test_usage_after_an_immediate_cancel_rated_before_it_is_priced_as_without_the_subscription(
        tmp_path: Path) -> None:
    async def start_then_cancel(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, "Canceled", 4, at=datetime(2026, 11, 6, 12, tzinfo=UTC).isoformat(),
                                 by="user:test", reason="canceled", lines=[])

    known_first, usage_first = await both_orders(tmp_path, start_then_cancel, close_november, AFTER_NOV_6)
    assert usage_first == known_first
    # The list price in November: 2 included, 10 x 1.00 + 68 x 0.50; logins 1.00 each; storage 40 x 0.10 at
    # November's close. The cut's usage lines (the final draft) bill none of it (Team priced a2 at 0.00, 100
    # included, and the final invoice billed it with the storage at Team's price).
    assert {event: known_first["per_event"][event] for event in ("a2", "l2", "l3", "s2")} == {
        "a2": 44_000_000_000, "l2": 1_000_000_000, "l3": 1_000_000_000, "s2": 4_000_000_000}
    assert known_first["lines"] == {}


async def test_usage_after_a_trials_unconverted_end_rated_before_it_is_priced_as_without_the_subscription(
        tmp_path: Path) -> None:
    async def trial_then_unconverted_end(service: RatingService) -> None:
        await subscribe(service, status="trialing", started=NOV_2, period=(NOV_2, DEC_2),
                        trial_end=datetime(2026, 11, 6, 12, tzinfo=UTC).isoformat())
        await subscription_event(service, "Canceled", 4, at=day(7).isoformat(), by="system:trial",
                                 reason="trial_ended_without_payment_method", lines=[])  # the tick, a day later

    known_first, usage_first = await both_orders(tmp_path, trial_then_unconverted_end, close_november, AFTER_NOV_6)
    assert usage_first == known_first
    assert {event: known_first["per_event"][event] for event in ("a2", "l2", "s2")} == {
        "a2": 44_000_000_000, "l2": 1_000_000_000, "s2": 4_000_000_000}
    assert known_first["totals"] == {("api_calls", "2026-11"): "80", ("logins", "2026-11"): "2",
                                     ("ai_tokens|model=small|input", "2026-11"): "1000"}


async def test_usage_after_a_cancel_at_period_end_rated_before_it_is_priced_as_without_the_subscription(
        tmp_path: Path) -> None:
    async def cancel_at_period_end(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, "CancelScheduled", 4, at=day(20).isoformat(), by="user:test",
                                 cancel_at=DEC_2.isoformat())
        await subscription_event(service, "PeriodEnded", 5, period_start=NOV_2.isoformat(),
                                 period_end=DEC_2.isoformat(), next_start=None, next_end=None)
        await subscription_event(service, "Canceled", 6, at=DEC_2.isoformat(), by="system:period_end",
                                 reason="canceled_at_period_end", lines=[])

    async def nothing(service: RatingService) -> None:
        return None

    december = [accepted("d1", "30", at=datetime(2026, 12, 5, tzinfo=UTC))]
    known_first, usage_first = await both_orders(tmp_path, cancel_at_period_end, nothing, december)
    assert usage_first == known_first
    # December's list price (2 included, 10 x 1.00 + 18 x 0.50), not Team's in a period that never came (0.00).
    assert known_first["per_event"] == {"d1": 19_000_000_000}


async def test_a_pause_or_resume_learnt_late_prices_nothing_otherwise(tmp_path: Path) -> None:
    async def pause_and_resume(service: RatingService) -> None:
        await start_team(service)
        await subscription_event(service, "Paused", 4, at=day(4).isoformat(), by="user:test")
        await subscription_event(service, "Resumed", 5, at=day(9).isoformat(), by="user:test")

    async def renew(service: RatingService) -> None:
        await end_period(service, NOV_2, DEC_2, JAN_2, position=6)

    known_first, usage_first = await both_orders(tmp_path, pause_and_resume, renew)
    assert usage_first == known_first
    # Usage while paused is priced as while active (Team, its allowance, its period): the ledger bills it as overage.
    assert (known_first["per_event"]["a1"], known_first["per_event"]["a2"]) == (5_000_000_000, 8_000_000_000)


async def test_a_repricing_reads_only_the_decisions_of_usage_at_or_after_its_instant(tmp_path: Path,
                                                                                     monkeypatch: Any) -> None:
    read: list[int] = []
    chains_since = repricing.chains_since

    def counted(rows: list[dict[str, Any]], moment: datetime) -> list[repricing.Chain]:
        read.append(len(rows))
        return chains_since(rows, moment)

    monkeypatch.setattr(repricing, "chains_since", counted)
    async with embedded_rating(tmp_path) as (service, bus):
        await catalogue(service)
        await start_team(service)
        # A month of usage before the change (October, and November before Nov 8), then two events after it.
        october = [accepted(f"o{n}", "1", at=datetime(2026, 10, 3 + n % 25, tzinfo=UTC)) for n in range(200)]
        early = [accepted(f"e{n}", "1", at=day(3)) for n in range(100)]
        await service.handle_accepted([*october, *early, accepted("a1", "150", at=day(9)),
                                       accepted("a2", "80", at=day(10))])
        read.clear()
        await subscription_event(service, **changed("basic", "team", day(8), 4))
        # The change could only move a1 and a2: their two decisions are all it read (it read the 302 of periods up to
        # a year back, once per subscription event).
        assert read == [2]
        repriced = {c["payload"]["cause"]["corrects"] for c in await published(bus)
                    if c["kind"] == "usage.debit" and c["payload"]["cause"].get("repriced")}
        assert repriced == {"a1", "a2"}
