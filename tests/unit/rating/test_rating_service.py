"""The rating service on its real embedded backends: real-time increments, AI tokens, close, late events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.catalog_view import CatalogError, build_view, validate_document
from billing_rating.close import close_period, lines_of
from billing_rating.service import CatalogBehind, RatingService
from billing_runtime.bus import EmbeddedBus, Record

from tests.unit.rating.support import embedded_rating

GRADUATED = {"model": "graduated", "unit": "USD", "tiers": [
    {"up_to": "10", "unit_amount": "1.00"}, {"up_to": None, "unit_amount": "0.50"}]}
CATALOG: dict[str, Any] = {"meters": [
    {"code": "api_calls", "aggregation": "sum", "price": GRADUATED, "included": "2"},
    {"code": "gpu_calls", "aggregation": "sum", "filters": {"region": ["eu"]},
     "price": {"model": "per_unit", "unit": "USD", "unit_amount": "2"}},
    {"code": "storage_gb", "aggregation": "max", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
    {"code": "seats", "aggregation": "last", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "5"}},
    {"code": "active_users", "aggregation": "unique_count", "value_property": "user",
     "price": {"model": "per_unit", "unit": "USD", "unit_amount": "1"}, "late_policy": "reject"},
    {"code": "ai_tokens", "aggregation": "sum", "required_properties": ["model"], "ai_prices": {
        "unit": "USD", "models": {"small": {"input": "0.15", "output": "0.60"},
                                  "large": {"input": "2.50", "output": "10.00", "cached_input": "1.25"}}}},
    {"code": "logins", "aggregation": "count", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "1"}},
]}


@pytest.fixture
async def rating(tmp_path: Path) -> AsyncIterator[tuple[RatingService, EmbeddedBus]]:
    async with embedded_rating(tmp_path) as (service, bus):
        catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2,
                              type="Catalog.Published", recorded_at=datetime.now(UTC),
                              data={"version": 1, "document": CATALOG})
        await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
        yield service, bus


def accepted(event_id: str, quantity: str, meter: str = "api_calls", catalog_version: int = 1,
             at: datetime = datetime(2026, 11, 21, 10, tzinfo=UTC), **properties: Any) -> Record:
    event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=quantity, timestamp=at,
                       properties=properties)
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime.now(UTC),
                            source="test", catalog_version=catalog_version)
    return Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())


async def published(bus: EmbeddedBus, topic: str = topics.LEDGER_COMMANDS) -> list[dict[str, Any]]:
    rows = await bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"', topic)
    return [json.loads(bytes(r["value"])) for r in rows]


async def test_tiered_charges_stay_exact_mid_period_with_allowance_first(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # 2 included, then 10 at 1.00, then 0.50: events of 5, 5, 5 -> totals 5, 10, 15 -> billable 3, 8, 13
    for i, q in enumerate(["5", "5", "5"]):
        await service.handle_accepted([accepted(f"e{i}", q)])
    commands = await published(bus)
    assert [Decimal(c["payload"]["amount"]) for c in commands] == [Decimal(3), Decimal(5), Decimal("3.5")]
    assert sum(int(c["payload"]["amount_subunits"]) for c in commands) == 11_500_000_000


async def test_a_redelivered_event_republishes_the_same_command(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("e1", "4")])
    await service.handle_accepted([accepted("e1", "4")])
    first, second = await published(bus)
    assert first == second
    assert UUID(str(first["command_id"])) == ids.usage_command_id("acme", "e1")
    cause = first["payload"]["cause"]
    assert (cause["quantity_before"], cause["quantity_after"], cause["event_ids"]) == ("0", "4", ["e1"])


async def test_an_event_validated_against_a_newer_catalogue_waits(rating) -> None:  # type: ignore[no-untyped-def]
    service, _ = rating
    with pytest.raises(CatalogBehind):
        await service.handle_accepted([accepted("e1", "1", catalog_version=2)])


async def test_ai_tokens_are_priced_per_model_and_token_class(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([
        accepted("a1", "1500", "ai_tokens", model="small", operation="chat", user="ann",
                 input_tokens=1000, output_tokens=500),
        accepted("a2", "3000", "ai_tokens", model="large", operation="embed", user="bob",
                 input_tokens=2000, cached_input_tokens=1000),
    ])
    commands = await published(bus)
    # small: 1000 * 0.15/1M + 500 * 0.60/1M = 0.00045; large: 2000 * 2.50/1M + 1000 * 1.25/1M = 0.00625
    assert [Decimal(c["payload"]["amount"]) for c in commands] == [Decimal("0.00045"), Decimal("0.00625")]
    assert [c["payload"]["cause"]["model"] for c in commands] == ["small", "large"]
    assert commands[0]["payload"]["cause"]["user"] == "ann"
    # What each event adds to the meter's total (a sum at close: its quantity), not the tokens' running totals.
    assert [c["payload"]["cause"]["contribution"] for c in commands] == ["1500", "3000"]


async def test_unknown_ai_model_is_dead_lettered(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("a1", "10", "ai_tokens", model="mystery", input_tokens=10)])
    assert await published(bus) == []
    [letter] = await published(bus, topics.USAGE_REJECTED)
    assert letter["reason"] == "no_price" and "mystery" in letter["detail"]


async def test_filtered_events_do_not_count(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("g1", "3", "gpu_calls", region="us"),
                                   accepted("g2", "3", "gpu_calls", region="eu")])
    assert [Decimal(c["payload"]["amount"]) for c in await published(bus)] == [Decimal(6)]


async def test_close_prices_max_last_and_unique_count_once(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([
        accepted("s1", "10", "storage_gb", at=day(1)), accepted("s2", "40", "storage_gb", at=day(2)),
        accepted("s3", "20", "storage_gb", at=day(3)),
        accepted("u1", "1", "seats", at=day(1)), accepted("u2", "7", "seats", at=day(5)),
        accepted("u3", "4", "seats", at=day(9)),
        accepted("x1", "1", "active_users", at=day(1), user="ann"),
        accepted("x2", "1", "active_users", at=day(2), user="bob"),
        accepted("x3", "1", "active_users", at=day(3), user="ann"),
    ])
    assert await published(bus) == []  # nothing is charged mid-period for these rules
    lines = {line.meter: line for line in await close_period(service.db, bus, service.catalog, "2026-11")}
    assert (lines["storage_gb"].quantity, lines["storage_gb"].amount) == ("40", "4.000000000")
    assert (lines["seats"].quantity, lines["seats"].amount) == ("4", "20.000000000")
    assert (lines["active_users"].quantity, lines["active_users"].amount) == ("2", "2.000000000")
    assert sorted(lines["storage_gb"].event_ids) == ["s1", "s2", "s3"]
    first = await published(bus)
    again = await close_period(service.db, bus, service.catalog, "2026-11")
    assert {line.meter for line in again} == set(lines)
    # A second close re-publishes nothing new: same lines, and the ledger would refuse the same ids anyway.
    assert len(await published(bus)) == len(first) == 3
    assert len({c["command_id"] for c in first}) == 3


async def test_late_events_follow_the_meter_policy(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    october = datetime(2026, 10, 20, tzinfo=UTC)
    await service.handle_accepted([accepted("o1", "1", "active_users", at=october, user="ann"),
                                   accepted("o2", "12", at=october)])
    await close_period(service.db, bus, service.catalog, "2026-10")
    await service.handle_accepted([accepted("late-reject", "1", "active_users", at=october, user="bob"),
                                   accepted("late-next", "5", at=october)])
    [letter] = await published(bus, topics.USAGE_REJECTED)
    assert (letter["reason"], letter["event_id"]) == ("period_closed", "late-reject")
    late = [c for c in await published(bus) if c["payload"]["cause"]["event_ids"] == ["late-next"]]
    assert late and late[0]["payload"]["cause"]["late"] == "late"
    assert late[0]["payload"]["cause"]["original_period"] == "2026-10"


YEARLY_WITH_MONTHLY_CREDITS = {"code": "yearly", "name": "Yearly", "currency": "USD", "cadence": "year",
                               "recurring_credits": [{"unit": "USD", "amount": "10", "cadence": "month"}]}


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["meters"].append({"code": "api_calls"}), "unique"),
    (lambda c: c["meters"][0]["price"]["tiers"].reverse(), "tiers"),
    (lambda c: c["meters"][1]["price"].update(unit_amount="-1"), "negative"),
    (lambda c: c["meters"][1]["price"].update(unit="ZZZ"), "ZZZ"),
    (lambda c: c.update(plans=[{"code": "pro", "name": "Pro", "currency": "USD",
                                "charges": [{"meter": "nope", "price": GRADUATED}]}]), "unknown meter"),
    (lambda c: c.update(plans=[YEARLY_WITH_MONTHLY_CREDITS]), "has cadence 'month' but the plan is billed per year"),
])
def test_bad_catalogues_are_refused_with_a_clear_message(change: Any, message: str) -> None:
    catalog = json.loads(json.dumps(CATALOG))
    change(catalog)
    with pytest.raises(CatalogError, match=message):
        validate_document(catalog)


def test_a_catalogue_published_before_a_check_was_added_still_loads() -> None:
    stored = {**json.loads(json.dumps(CATALOG)), "plans": [YEARLY_WITH_MONTHLY_CREDITS]}
    assert ("yearly", 1) in build_view(3, stored, {("yearly", 1): YEARLY_WITH_MONTHLY_CREDITS}).plans


def correction(event_id: str, of: str, quantity: str, meter: str = "api_calls", catalog_version: int = 1,
               **properties: Any) -> Record:
    event = UsageEvent(id=event_id, tenant="acme", meter=meter, quantity=quantity, correction_of=of,
                       timestamp=datetime(2026, 11, 22, tzinfo=UTC), properties=properties)
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime.now(UTC),
                            source="test", catalog_version=catalog_version)
    return Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())


async def test_corrections_re_rate_by_the_difference_and_keep_both_in_history(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("e1", "12")])              # 2 included, 10 at 1.00 -> 10.00
    await service.handle_accepted([correction("c1", "e1", "14")])      # 12 billable: 10 + 2 x 0.50 -> +1.00
    await service.handle_accepted([correction("c2", "e1", "0")])       # void: back to 0 -> -11.00
    amounts = [Decimal(c["payload"]["amount"]) for c in await published(bus)]
    assert amounts == [Decimal(10), Decimal(1), Decimal(-11)]
    assert sum(amounts) == 0
    commands = await published(bus)
    assert commands[1]["payload"]["cause"]["corrects"] == "e1"
    rows = await service.db.fetch("SELECT event_id, corrects FROM rated_events ORDER BY rated_at")
    assert [(r["event_id"], r["corrects"]) for r in rows] == [("e1", None), ("c1", "e1"), ("c2", "e1")]


async def test_corrections_of_unknown_events_or_other_meters_are_dead_lettered(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("e1", "5")])
    await service.handle_accepted([correction("c1", "nope", "1"), correction("c2", "e1", "1", meter="gpu_calls")])
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [(d["event_id"], d["reason"]) for d in letters] == [("c1", "unknown_correction"),
                                                               ("c2", "invalid_correction")]


async def test_a_corrected_max_meter_closes_on_the_corrected_value(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("s1", "10", "storage_gb"), accepted("s2", "90", "storage_gb")])
    await service.handle_accepted([correction("c1", "s2", "30", meter="storage_gb")])
    lines = {line.meter: line for line in await close_period(service.db, bus, service.catalog, "2026-11")}
    assert lines["storage_gb"].quantity == "30"


async def test_a_close_line_counts_a_correction_by_its_difference(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("a1", "500"), accepted("l1", "1", "logins"),
                                   accepted("l2", "1", "logins")])
    await service.handle_accepted([correction("c1", "a1", "700"), correction("c2", "l2", "0", meter="logins")])
    charged = sum(int(c["payload"]["amount_subunits"]) for c in await published(bus))
    lines = {line.meter: line for line in await close_period(service.db, bus, service.catalog, "2026-11")}
    # 700 calls (not 500 + 700): 2 included, 10 x 1.00, 688 x 0.50 = 354.00; one login left (not 3), 1.00.
    assert (lines["api_calls"].quantity, lines["api_calls"].amount) == ("700", "354.000000000")
    assert (lines["logins"].quantity, lines["logins"].amount) == ("1", "1.000000000")
    assert sum(line.amount_subunits for line in lines.values()) == charged  # the lines say what was charged


async def test_a_correction_in_the_same_batch_as_its_original_amends_it(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # One poll carries the event and its correction (whole-poll batches make this likelier): 12 then 14.
    await service.handle_accepted([accepted("e1", "12"), correction("c1", "e1", "14"), correction("c2", "e1", "0")])
    amounts = [Decimal(c["payload"]["amount"]) for c in await published(bus)]
    assert amounts == [Decimal(10), Decimal(1), Decimal(-11)]
    assert await published(bus, topics.USAGE_REJECTED) == []
    # The same three in separate batches give the same decisions (test above); a redelivery changes nothing.
    await service.handle_accepted([accepted("e1", "12"), correction("c1", "e1", "14"), correction("c2", "e1", "0")])
    assert [Decimal(c["payload"]["amount"]) for c in await published(bus)] == amounts * 2
    totals = await service.db.fetch("SELECT quantity FROM period_totals")
    assert [r["quantity"] for r in totals] == ["0"]


async def test_ledger_events_rating_does_not_follow_are_skipped_by_their_type_header(rating) -> None:  # type: ignore[no-untyped-def]
    service, _ = rating
    newer = LedgerEvent(position=9, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                        recorded_at=datetime.now(UTC), data={"version": 2, "document": CATALOG})
    await service.handle_ledger_events([
        Record(topics.LEDGER_EVENTS, 0, 1, None, b"not json", (("type", b"BillingAccount.UsageDebited"),)),
        Record(topics.LEDGER_EVENTS, 0, 2, None, newer.to_json(), (("type", b"Catalog.Published"),)),
    ])
    assert service.catalog.version == 2


# -- subscriptions: the renewal invoice's usage lines, closing the period, late events ------------------------

def per_unit(amount: str) -> dict[str, str]:
    return {"model": "per_unit", "unit": "USD", "unit_amount": amount}


TEAM = {"code": "team", "name": "Team", "version": 1, "currency": "USD", "charges": [
    {"meter": "api_calls", "price": per_unit("0.10"), "included": "100"},
    {"meter": "storage_gb", "price": per_unit("0.50"), "included": "10"},
    {"meter": "seats", "price": per_unit("1.00"), "included": "1"},
    {"meter": "logins", "price": per_unit("1.00"), "included": "1"}]}
NOV, DEC, JAN = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
BASIC = {"code": "basic", "name": "Basic", "version": 1, "currency": "USD", "charges": []}
SUBSCRIPTION = UUID("6d4f2c0e-1b8a-4c47-9a55-0d2b3c4e5f60")


async def subscription_event(service: RatingService, kind: str, position: int, subscription: UUID = SUBSCRIPTION,
                             **data: Any) -> None:
    event = LedgerEvent(position=position, aggregate_id=subscription, aggregate_version=position, recorded_at=NOV,
                        type=f"Subscription.{kind}", data=data)
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json())])


async def subscribe(service: RatingService, status: str = "active", plan: str = "team",
                            subscription: UUID = SUBSCRIPTION, started: datetime = NOV,
                            period: tuple[datetime, datetime] = (NOV, DEC), **calendar: Any) -> None:
    """``calendar``: the Started event's ``time_zone`` and ``anchor_day`` (default UTC, the start's day)."""
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 2, "document": {**CATALOG, "plans": [TEAM, BASIC]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 2, None, catalog.to_json())])
    await subscription_event(service, "Started", 3, subscription, tenant="acme", plan={"code": plan, "version": 1},
                             quantity=1, status=status, started_at=started.isoformat(),
                             period_start=period[0].isoformat(), period_end=period[1].isoformat(), **calendar)


async def end_period(service: RatingService, start: datetime, end: datetime, next_end: datetime,
                     position: int = 4) -> None:
    await subscription_event(service, "PeriodEnded", position, period_start=start.isoformat(),
                             period_end=end.isoformat(), next_start=end.isoformat(), next_end=next_end.isoformat())


def usage_lines(commands: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """meter -> (quantity, amount) of the last usage lines sent."""
    [*_, last] = [c for c in commands if c["kind"] == "invoice.usage_lines"]
    return {line["meter"]: (line["quantity"], line["amount"]) for line in last["payload"]["lines"]}


async def test_max_and_last_meters_are_billed_at_the_plan_price_when_the_subscription_period_ends(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([
        accepted("a1", "150", at=day(3)),                                      # 100 included, 50 x 0.10
        accepted("s1", "20", "storage_gb", at=day(2)), accepted("s2", "40", "storage_gb", at=day(5)),
        accepted("s3", "30", "storage_gb", at=day(20)),                        # max 40
        accepted("u1", "5", "seats", at=day(3)), accepted("u2", "3", "seats", at=day(25)),  # last 3
    ])
    await end_period(service, NOV, DEC, JAN)
    commands = await published(bus)
    debits = {c["payload"]["meter"]: c for c in commands if c["kind"] == "usage.debit"}
    # The plan's price and allowance: (40 - 10) x 0.50 and (3 - 1) x 1.00, not the list's 40 x 0.10, 3 x 5.
    assert {m: c["payload"]["amount"] for m, c in debits.items()} == {
        "api_calls": "5.000000000", "storage_gb": "15.000000000", "seats": "2.000000000"}
    assert debits["storage_gb"]["command_id"] == str(ids.command_id(
        "usage.close", str(ids.account_id("acme")), "storage_gb", "", NOV.isoformat()))
    assert debits["storage_gb"]["payload"]["cause"]["priced_by"] == "plan"
    # The close debits go before the usage lines that finalize the invoice, which shows all three meters.
    assert [c["kind"] for c in commands][-1] == "invoice.usage_lines"
    assert usage_lines(commands) == {"api_calls": ("150", "5.000000000"), "storage_gb": ("40", "15.000000000"),
                                     "seats": ("3", "2.000000000")}
    # Delivered again, the PeriodEnded sends the same commands (same ids): the ledger posts each once.
    await end_period(service, NOV, DEC, JAN)
    again = (await published(bus))[len(commands):]
    assert [c["command_id"] for c in again] == [c["command_id"] for c in commands[1:]]
    assert usage_lines(again) == usage_lines(commands)


async def test_voiding_the_last_reading_of_a_last_meter_bills_the_reading_before_it(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("u1", "7", "seats", at=day(3)), accepted("u2", "9", "seats", at=day(20)),
                                   accepted("s1", "7", "storage_gb", at=day(3)),
                                   accepted("s2", "19", "storage_gb", at=day(20))])
    await service.handle_accepted([correction("v1", "u2", "0", meter="seats"),
                                   correction("v2", "s2", "0", meter="storage_gb")])
    await end_period(service, NOV, DEC, JAN)
    commands = await published(bus)
    debits = {c["payload"]["meter"]: c["payload"]["amount"] for c in commands if c["kind"] == "usage.debit"}
    # The void takes the 9 back: 7 seats, 1 included, 6 x 1.00 (not 0 seats); like max: 7 GB, all included (a
    # debit of 0: the ledger records the quantity for the monthly usage summary).
    assert debits == {"seats": "6.000000000", "storage_gb": "0.000000000"}
    assert usage_lines(commands) == {"seats": ("7", "6.000000000"), "storage_gb": ("7", "0.000000000")}


async def test_a_last_reading_of_zero_is_billed_as_zero(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("u1", "7", "seats", at=day(3)), accepted("u2", "0", "seats", at=day(20))])
    [line] = await close_period(service.db, bus, service.catalog, "2026-11")
    assert (line.meter, line.quantity, line.amount) == ("seats", "0", "0.000000000")


REGIONAL_CALLS = {"model": "graduated", "unit": "USD", "tiers": [
    {"up_to": "100", "unit_amount": "0.10"}, {"up_to": None, "unit_amount": "0.05"}]}
REGIONAL = {"code": "regional", "name": "Regional", "version": 1, "currency": "USD", "charges": [
    {"meter": "regional_calls", "price": REGIONAL_CALLS, "included": "100"},
    {"meter": "regional_storage", "price": per_unit("1.00"), "included": "10"}]}
GROUPED_METERS = [
    {"code": "regional_calls", "aggregation": "sum", "group_by": ["region"], "price": per_unit("0.10")},
    {"code": "regional_storage", "aggregation": "max", "group_by": ["region"], "price": per_unit("1.00")}]


async def test_a_meters_allowance_and_tiers_apply_once_per_period_across_its_groups(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    document = {**CATALOG, "meters": [*CATALOG["meters"], *GROUPED_METERS], "plans": [REGIONAL]}
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 2, "document": document})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 2, None, catalog.to_json())])
    await subscription_event(service, "Started", 3, tenant="acme", plan={"code": "regional", "version": 1},
                             quantity=1, status="active", started_at=NOV.isoformat(), period_start=NOV.isoformat(),
                             period_end=DEC.isoformat())
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([
        accepted(f"c{d}", "150", "regional_calls", 2, day(d), region=region)
        for d, region in ((3, "eu"), (4, "us"), (5, "ap"))])
    await service.handle_accepted([accepted("s1", "8", "regional_storage", 2, day(6), region="eu"),
                                   accepted("s2", "7", "regional_storage", 2, day(7), region="us")])
    # 450 calls, 100 included, 350 billable: 100 x 0.10 + 250 x 0.05 = 22.50, not 3 x (50 x 0.10) = 15.00.
    debits = [c["payload"]["amount"] for c in await published(bus) if c["kind"] == "usage.debit"]
    assert debits == ["5.000000000", "10.000000000", "7.500000000"]
    await end_period(service, NOV, DEC, JAN)
    commands = await published(bus)
    # 8 + 7 GB, 10 included: 5.00 (each region under its own 10 would bill nothing); the invoice agrees.
    closed = [c["payload"] for c in commands if c["kind"] == "usage.debit" and c["payload"]["cause"].get("closed")]
    # The eu group, within the allowance, is recorded at 0 (its quantity for the monthly usage summary).
    assert [(d["cause"]["group"], d["cause"]["quantity"], d["amount"]) for d in closed] == [
        ("region=eu", "8", "0.000000000"), ("region=us", "7", "5.000000000")]
    assert usage_lines(commands) == {"regional_calls": ("450", "22.500000000"),
                                     "regional_storage": ("15", "5.000000000")}
    lines = [line for line in await lines_of(service.db, NOV.isoformat()) if line.meter == "regional_calls"]
    assert sum(Decimal(line.amount) for line in lines) == Decimal("22.5")
    assert sum(Decimal(line.billable) for line in lines) == 350


async def publish_grouped_meters(service: RatingService) -> None:
    document = {**CATALOG, "meters": [*CATALOG["meters"], *GROUPED_METERS]}
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 2, "document": document})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 2, None, catalog.to_json())])


async def test_a_correction_into_another_group_moves_its_whole_quantity_out_of_the_originals_group(rating) -> None:  # type: ignore[no-untyped-def]
    # Audit: a correction whose properties put it in another group moved only the difference into the new group:
    # 100 eu calls corrected to 80 us calls left eu at 100 and us at 50 - 20 = 30 (a correction to less than the
    # difference took the new group's total below zero and was refused).
    service, bus = rating
    await publish_grouped_meters(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("e1", "100", "regional_calls", 2, day(3), region="eu"),
                                   accepted("e2", "50", "regional_calls", 2, day(4), region="us"),
                                   accepted("s1", "8", "regional_storage", 2, day(5), region="eu"),
                                   accepted("s2", "7", "regional_storage", 2, day(6), region="us")])
    await service.handle_accepted([correction("c1", "e1", "80", "regional_calls", catalog_version=2, region="us"),
                                   correction("c2", "e2", "10", "regional_calls", catalog_version=2, region="ap"),
                                   correction("s3", "s1", "9", "regional_storage", catalog_version=2, region="us")])
    assert await published(bus, topics.USAGE_REJECTED) == []
    debits = {c["payload"]["cause"]["event_ids"][0]: c["payload"] for c in await published(bus)}
    # The charge is the meter's difference (-2.00, -4.00); the debit names the group the event left.
    assert [(debits[e]["amount"], debits[e]["cause"]["group"], debits[e]["cause"].get("group_old"))
            for e in ("c1", "c2")] == [("-2.000000000", "region=us", "region=eu"),
                                       ("-4.000000000", "region=ap", "region=us")]
    totals = {r["meter"]: r["quantity"] for r in await service.db.fetch("SELECT meter, quantity FROM period_totals")}
    assert {k: Decimal(v) for k, v in totals.items()} == {
        "regional_calls|region=eu": 0, "regional_calls|region=us": 80, "regional_calls|region=ap": 10}
    await service.handle_accepted([correction("c3", "e1", "60", "regional_calls", catalog_version=2, region="ap")])
    lines = {(line.meter, line.group): line for line in await close_period(service.db, bus, service.catalog,
                                                                           "2026-11")}
    # Each group's line holds what its events count now: eu nothing, us e2's 10 ... moved to ap, ap 10 + 60.
    assert {k: (Decimal(v.quantity), Decimal(v.amount)) for k, v in lines.items()} == {
        ("regional_calls", "region=eu"): (0, 0), ("regional_calls", "region=us"): (0, 0),
        ("regional_calls", "region=ap"): (70, 7),
        ("regional_storage", "region=eu"): (0, 0), ("regional_storage", "region=us"): (9, 9)}
    charged = sum(int(c["payload"]["amount_subunits"]) for c in await published(bus)
                  if c["payload"]["meter"] == "regional_calls")
    assert sum(v.amount_subunits for k, v in lines.items() if k[0] == "regional_calls") == charged


async def test_usage_at_close_is_free_while_the_pricing_subscription_is_trialing(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # The primary (earliest) subscription's plan has no storage charge; a second one, on trial, prices it.
    await subscribe(service, plan="basic")
    await subscribe(service, status="trialing", subscription=UUID(int=7), started=datetime(2026, 11, 2,
                                                                                                   tzinfo=UTC))
    await service.handle_accepted([accepted("s1", "40", "storage_gb", at=datetime(2026, 11, 5, tzinfo=UTC))])
    await end_period(service, NOV, DEC, JAN)
    commands = await published(bus)
    # Nothing charged: the close debit is of 0, recording the 40 GB (the monthly usage summary shows them).
    assert [(c["kind"], c["payload"].get("amount"), c["payload"].get("cause", {}).get("quantity"))
            for c in commands] == [("usage.debit", "0.000000000", "40"), ("invoice.usage_lines", None, None)]
    assert usage_lines(commands) == {"storage_gb": ("40", "0.000000000")}


async def test_an_incomplete_subscription_gives_no_plan_price_until_its_first_invoice_is_paid(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # charge_before_access: not paid yet, the account is priced as one without the plan (list price, its 2
    # included); once Activated (paid on Nov 10, its period starting then), the plan's price and allowance.
    await subscribe(service, status="incomplete")
    await service.handle_accepted([accepted("a1", "150", at=datetime(2026, 11, 3, tzinfo=UTC))])
    nov_10 = datetime(2026, 11, 10, tzinfo=UTC)
    await subscription_event(service, "Activated", 4, at=nov_10.isoformat(), by="gateway:stripe",
                             period_start=nov_10.isoformat(), period_end=datetime(2026, 12, 10, tzinfo=UTC).isoformat(),
                             anchor_day=10)
    await service.handle_accepted([accepted("a2", "150", at=datetime(2026, 11, 12, tzinfo=UTC))])
    debits = [c["payload"] for c in await published(bus) if c["kind"] == "usage.debit"]
    # 10 x 1.00 + 138 x 0.50 at the list price; then 100 included and 50 x 0.10 at the plan's.
    assert [(d["amount"], d["cause"]["priced_by"], d["cause"]["period"]) for d in debits] == [
        ("79.000000000", "list_price", "2026-11"), ("5.000000000", "plan", nov_10.isoformat())]


async def test_usage_line_quantities_follow_corrections_and_count_events(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    at = datetime(2026, 11, 10, tzinfo=UTC)
    await service.handle_accepted([accepted("a1", "200", at=at), accepted("l1", "5", "logins", at=at),
                                   accepted("l2", "7", "logins", at=at)])
    await service.handle_accepted([correction("c1", "a1", "100")])    # 200 corrected to 100: nothing billable
    await end_period(service, NOV, DEC, JAN)
    # 100 calls (not 200 + 100), 2 logins (not 5 + 7), one of them included.
    assert usage_lines(await published(bus)) == {"api_calls": ("100", "0.000000000"), "logins": ("2", "1.000000000")}


async def test_a_late_event_of_an_ended_subscription_period_follows_the_late_policy(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await service.handle_accepted([accepted("n1", "150", at=datetime(2026, 11, 20, tzinfo=UTC))])  # 5.00
    await end_period(service, NOV, DEC, JAN)
    await service.handle_accepted([accepted("d1", "120", at=datetime(2026, 12, 5, tzinfo=UTC))])  # 2.00
    # Nov 30, after the renewal: 50 more calls. The Nov period is closed and invoiced; next_period (the meter's
    # default) prices them on November's total and allowance (150 -> 200: 5.00, as if they had come in time), never
    # on December's 120 (their price would then depend on what December used before they came): the ledger draws
    # them from November's credit and bills the rest as November's overage on the next renewal invoice.
    # active_users' policy is reject: a dead letter.
    november_30 = datetime(2026, 11, 30, 12, tzinfo=UTC)
    await service.handle_accepted([accepted("late", "50", at=november_30),
                                   accepted("late-user", "1", "active_users", at=november_30, user="ann")])
    late = [c for c in await published(bus) if c["payload"].get("cause", {}).get("event_ids") == ["late"]]
    assert [c["payload"]["amount"] for c in late] == ["5.000000000"]
    cause = late[0]["payload"]["cause"]
    assert (cause["period"], cause["original_period"], cause["late"]) == (NOV.isoformat(), NOV.isoformat(), "late")
    [letter] = await published(bus, topics.USAGE_REJECTED)
    assert (letter["event_id"], letter["reason"]) == ("late-user", "period_closed")
    # ... and not on December's usage line (December's 120 calls: 2.00), which it would be billed twice with.
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus)) == {"api_calls": ("120", "2.000000000")}


def late_debits(commands: list[dict[str, Any]], event_id: str) -> list[tuple[str, str, str | None, str | None]]:
    """(amount, period, original_period, contribution) of the debits of ``event_id``."""
    return [(c["payload"]["amount"], c["payload"]["cause"]["period"], c["payload"]["cause"].get("original_period"),
             c["payload"]["cause"].get("contribution")) for c in commands
            if c["kind"] == "usage.debit" and c["payload"]["cause"].get("event_ids") == [event_id]]


async def test_a_late_event_of_a_max_meter_counts_in_its_own_closed_periods_peak_never_the_open_ones(rating) -> None:  # type: ignore[no-untyped-def]
    """Team (storage_gb: the period's peak, 10 GB included, 0.50 a GB). November peaks at 40 GB: 15.00 on the Dec 1
    renewal. December peaks at 25 GB. A reading of 60 GB on Nov 20 arrives on Dec 5: November's peak was 60 GB, 25.00,
    so November owes 10.00 more, named by November (the ledger bills it as that period's overage); a second late
    reading of 50 GB raises nothing. December's peak stays 25 GB, 7.50. The late reading used to count in December's
    peak: 60 GB, 25.00 on January's invoice, November's 15.00 unchanged."""
    service, bus = rating
    await subscribe(service)
    day = lambda d, month=11: datetime(2026, month, d, tzinfo=UTC)
    await service.handle_accepted([accepted("s1", "20", "storage_gb", at=day(2)),
                                   accepted("s2", "40", "storage_gb", at=day(5))])
    await end_period(service, NOV, DEC, JAN)
    assert usage_lines(await published(bus))["storage_gb"] == ("40", "15.000000000")
    await service.handle_accepted([accepted("d1", "25", "storage_gb", at=day(3, 12))])
    await service.handle_accepted([accepted("late-1", "60", "storage_gb", at=day(20))])
    await service.handle_accepted([accepted("late-2", "50", "storage_gb", at=day(25))])
    commands = await published(bus)
    assert late_debits(commands, "late-1") == [("10.000000000", NOV.isoformat(), NOV.isoformat(), "20")]
    assert late_debits(commands, "late-2") == [("0.000000000", NOV.isoformat(), NOV.isoformat(), "0")]
    late = next(c for c in commands if c["payload"].get("cause", {}).get("event_ids") == ["late-1"])
    assert (late["payload"]["cause"]["late"], late["payload"]["overage_policy"]) == ("late", "overage")
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus))["storage_gb"] == ("25", "7.500000000")


async def test_a_late_reading_of_a_last_meter_bills_its_own_period_from_its_time_on(rating) -> None:  # type: ignore[no-untyped-def]
    """Team (seats: the last reading, 1 included, 1.00 a seat). November's last reading, 5 seats on Nov 10, was billed
    4.00; a reading of 8 seats on Nov 28 arrives on Dec 5: November's last reading was 8, 3.00 more; one of 3 seats on
    Nov 20 changes nothing (8 is still the last). December's reading, 2 seats on Dec 2, is December's (1.00)."""
    service, bus = rating
    await subscribe(service)
    await service.handle_accepted([accepted("u1", "5", "seats", at=datetime(2026, 11, 10, tzinfo=UTC))])
    await end_period(service, NOV, DEC, JAN)
    await service.handle_accepted([accepted("u2", "2", "seats", at=datetime(2026, 12, 2, tzinfo=UTC))])
    await service.handle_accepted([accepted("late-8", "8", "seats", at=datetime(2026, 11, 28, tzinfo=UTC)),
                                   accepted("late-3", "3", "seats", at=datetime(2026, 11, 20, tzinfo=UTC))])
    commands = await published(bus)
    assert late_debits(commands, "late-8") == [("3.000000000", NOV.isoformat(), NOV.isoformat(), "3")]
    assert late_debits(commands, "late-3") == [("0.000000000", NOV.isoformat(), NOV.isoformat(), "0")]
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus))["seats"] == ("2", "1.000000000")


def corrections_of(commands: list[dict[str, Any]], event_id: str) -> list[tuple[str, str, str | None, str | None]]:
    """(amount, period, original_period, late) of the debits correcting ``event_id``."""
    return [(c["payload"]["amount"], c["payload"]["cause"]["period"], c["payload"]["cause"].get("original_period"),
             c["payload"]["cause"].get("late")) for c in commands
            if c["kind"] == "usage.debit" and c["payload"]["cause"].get("corrects") == event_id]


async def test_a_late_correction_with_no_usage_in_the_open_period_gives_back_in_its_original_period(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await service.handle_accepted([accepted("n1", "250", at=datetime(2026, 11, 20, tzinfo=UTC))])  # 15.00
    await end_period(service, NOV, DEC, JAN)
    # Dec 5, nothing used in December yet: November's 250 corrected to 150. It was -100 on December's 0 (a
    # negative total: the batch raised and the partition stopped); it is 10.00 given back for November.
    await service.handle_accepted([correction("c1", "n1", "150")])
    assert corrections_of(await published(bus), "n1") == [
        ("-10.000000000", NOV.isoformat(), NOV.isoformat(), "late")]
    totals = await service.db.fetch("SELECT period, quantity FROM period_totals")
    assert {r["period"]: r["quantity"] for r in totals} == {NOV.isoformat(): "150"}


async def test_a_late_correction_is_priced_on_its_original_periods_total_never_the_open_ones(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await service.handle_accepted([accepted("n1", "250", at=datetime(2026, 11, 20, tzinfo=UTC))])  # 15.00
    await end_period(service, NOV, DEC, JAN)
    await service.handle_accepted([accepted("d1", "130", at=datetime(2026, 12, 3, tzinfo=UTC))])  # 3.00
    # November billed 250 calls (15.00) for 150 (5.00): 10.00 back, named by November, whose invoice billed it
    # (December's margin gave 3.00 back: 130 -> 30). A second correction prices on November's corrected total.
    await service.handle_accepted([correction("c1", "n1", "150")])
    await service.handle_accepted([correction("c2", "n1", "120")])  # 150 -> 120: 3.00 more
    assert corrections_of(await published(bus), "n1") == [
        ("-10.000000000", NOV.isoformat(), NOV.isoformat(), "late"),
        ("-3.000000000", NOV.isoformat(), NOV.isoformat(), "late")]
    rows = await service.db.fetch("SELECT event_id, period, decision, amount_subunits FROM rated_events")
    assert decisions(rows)["c2"] == (NOV.isoformat(), "late:priced", -3_000_000_000)
    totals = await service.db.fetch("SELECT period, quantity FROM period_totals")
    assert {r["period"]: r["quantity"] for r in totals} == {NOV.isoformat(): "120", DEC.isoformat(): "130"}
    # December's invoice bills December's usage only; November's correction is the ledger's credit note.
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus)) == {"api_calls": ("130", "3.000000000")}


async def test_a_late_correction_is_priced_as_its_period_was_billed_after_the_subscription_ended(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("n1", "250", at=day(3))])  # the plan: 100 included, 15.00
    await subscription_event(service, "Canceled", 4, at=day(16).isoformat(), by="user:test", reason="canceled",
                             lines=[])
    # No live subscription now (the list price would make it 50.00), but the cut period was billed at the plan's.
    await service.handle_accepted([correction("c1", "n1", "150")])
    assert corrections_of(await published(bus), "n1") == [
        ("-10.000000000", NOV.isoformat(), NOV.isoformat(), "late")]


async def test_corrections_that_cannot_be_priced_are_dead_lettered_never_raised(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("s1", "40", "storage_gb", at=day(3)),     # max: priced at close
                                   accepted("g1", "3", "gpu_calls", at=day(3), region="us")])  # filtered out
    await end_period(service, NOV, DEC, JAN)
    await service.handle_accepted([accepted("a1", "10", "ai_tokens", at=datetime(2026, 12, 2, tzinfo=UTC),
                                            model="mystery", input_tokens=10)])  # no_price
    # Closed November's max was priced by its close: not priced again (it was counted into December's max).
    # A dead-lettered event billed nothing to correct.
    await service.handle_accepted([correction("c1", "s1", "10", meter="storage_gb"),
                                   correction("c2", "a1", "5", meter="ai_tokens", model="small")])
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [(d["event_id"], d["reason"]) for d in letters] == [
        ("a1", "no_price"), ("c1", "period_closed"), ("c2", "invalid_correction")]
    assert "priced at its close" in letters[1]["detail"] and "was refused (no_price)" in letters[2]["detail"]
    assert [c for c in await published(bus) if c["payload"].get("cause", {}).get("corrects")] == []
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus)) == {}


def gpu_debits(commands: list[dict[str, Any]]) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """(amount, period, corrects, quantity_old, quantity_new) of the gpu_calls debits (2.00 a call, no plan)."""
    return [(c["payload"]["amount"], c["payload"]["cause"]["period"], c["payload"]["cause"].get("corrects"),
             c["payload"]["cause"].get("quantity_old"), c["payload"]["cause"].get("quantity_new"))
            for c in commands if c["kind"] == "usage.debit" and c["payload"]["meter"] == "gpu_calls"]


async def test_a_correction_of_a_filtered_event_counts_its_own_quantity_never_a_difference(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # g1 (region us) is filtered out: it counts nothing. Corrected into an eu event of 5, it is a fresh 5 calls,
    # 10.00 (it was 5 - 3 = 2 calls, 4.00); g2's 3 corrected into 1 is a fresh call, 2.00 (it was 1 - 3 below
    # zero: a dead letter). A second correction is the difference against the first: 5 -> 6, 2.00 more.
    await service.handle_accepted([accepted("g1", "3", "gpu_calls", region="us"),
                                   accepted("g2", "3", "gpu_calls", region="us")])
    await service.handle_accepted([correction("c1", "g1", "5", meter="gpu_calls", region="eu"),
                                   correction("c2", "g2", "1", meter="gpu_calls", region="eu")])
    await service.handle_accepted([correction("c3", "g1", "6", meter="gpu_calls", region="eu")])
    assert gpu_debits(await published(bus)) == [
        ("10.000000000", "2026-11", "g1", "0", "5"), ("2.000000000", "2026-11", "g2", "0", "1"),
        ("2.000000000", "2026-11", "g1", "5", "6")]
    assert await published(bus, topics.USAGE_REJECTED) == []
    causes = [c["payload"]["cause"] for c in await published(bus)]
    assert causes[0]["quantity_old_uncounted"] == "3" and "quantity_old_uncounted" not in causes[2]
    totals = await service.db.fetch("SELECT meter, quantity FROM period_totals")
    assert {r["meter"]: r["quantity"] for r in totals} == {"gpu_calls": "7"}


async def test_a_correction_filtered_out_itself_counts_nothing_and_one_of_a_counted_event_is_refused(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("g1", "3", "gpu_calls", region="us"),     # filtered out
                                   accepted("g2", "3", "gpu_calls", region="eu")])    # 6.00
    # A filtered event corrected into another filtered one stays filtered out: nothing billed, and a later
    # correction that passes counts its own quantity (2 calls, 4.00). A correction of a counted event that the
    # filters leave out is refused: it would leave g2's 3 calls in the total while amending it to 1 (the next
    # correction, 3 -> 1, then gave nothing back); the next one amends the 3 calls.
    await service.handle_accepted([correction("c1", "g1", "4", meter="gpu_calls", region="us"),
                                   correction("c2", "g2", "1", meter="gpu_calls", region="us")])
    await service.handle_accepted([correction("c3", "g1", "2", meter="gpu_calls", region="eu"),
                                   correction("c4", "g2", "1", meter="gpu_calls", region="eu")])
    assert gpu_debits(await published(bus)) == [
        ("6.000000000", "2026-11", None, None, None), ("4.000000000", "2026-11", "g1", "0", "2"),
        ("-4.000000000", "2026-11", "g2", "3", "1")]
    [letter] = await published(bus, topics.USAGE_REJECTED)
    assert (letter["event_id"], letter["reason"]) == ("c2", "invalid_correction")
    assert "does not pass the filters of meter 'gpu_calls' (region)" in letter["detail"]
    rows = await service.db.fetch("SELECT event_id, decision, corrects FROM rated_events")
    assert {r["event_id"]: (r["decision"], r["corrects"]) for r in rows}["c1"] == ("filtered", "g1")
    totals = await service.db.fetch("SELECT meter, quantity FROM period_totals")
    assert {r["meter"]: r["quantity"] for r in totals} == {"gpu_calls": "3"}


async def test_a_late_correction_of_a_filtered_event_bills_its_own_quantity_in_the_closed_period(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("g1", "3", "gpu_calls", at=day(3), region="us"),   # filtered out
                                   accepted("g2", "1", "gpu_calls", at=day(4), region="eu")])  # 2.00
    await end_period(service, NOV, DEC, JAN)
    await service.handle_accepted([accepted("d1", "2", "gpu_calls", at=datetime(2026, 12, 2, tzinfo=UTC),
                                            region="eu")])                                     # December: 4.00
    # November billed 1 call. g1 corrected into 4 eu calls is 4 calls more for November, 8.00 of its overage
    # (it was 4 - 3 = 1 call, 2.00); then 4 -> 2 gives 4.00 back. December's total and invoice are untouched.
    await service.handle_accepted([correction("c1", "g1", "4", meter="gpu_calls", region="eu")])
    await service.handle_accepted([correction("c2", "g1", "2", meter="gpu_calls", region="eu")])
    assert corrections_of(await published(bus), "g1") == [
        ("8.000000000", NOV.isoformat(), NOV.isoformat(), "late"),
        ("-4.000000000", NOV.isoformat(), NOV.isoformat(), "late")]
    totals = await service.db.fetch("SELECT period, quantity FROM period_totals WHERE meter = 'gpu_calls'")
    assert {r["period"]: r["quantity"] for r in totals} == {NOV.isoformat(): "3", DEC.isoformat(): "2"}
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    assert usage_lines(await published(bus)) == {"gpu_calls": ("2", "4.000000000")}


async def test_a_voided_count_event_amended_again_counts_once_more(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # logins counts events (1.00 each). A void takes l1 out; amended again it is one login again (it was
    # 1 - 1 = nothing: the void's quantity 0 was taken for a counted event).
    await service.handle_accepted([accepted("l1", "5", "logins")])
    await service.handle_accepted([correction("c1", "l1", "0", meter="logins")])
    await service.handle_accepted([correction("c2", "l1", "7", meter="logins")])
    assert [c["payload"]["amount"] for c in await published(bus)] == ["1.000000000", "-1.000000000", "1.000000000"]
    totals = await service.db.fetch("SELECT quantity FROM period_totals WHERE meter = 'logins'")
    assert [r["quantity"] for r in totals] == ["1"]
    # Each debit names the event's own quantity and what it added to the count (the monthly usage summary adds
    # that): one login of quantity 5, the void one less, the amendment one more.
    assert [(c["payload"]["cause"]["quantity"], c["payload"]["cause"]["contribution"])
            for c in await published(bus)] == [("5", "1"), ("0", "-1"), ("7", "1")]


async def test_amounts_are_written_in_plain_notation_never_with_an_exponent(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service, status="trialing")
    at = datetime(2026, 11, 10, tzinfo=UTC)
    # One input token of the small model: 0.15 USD per million, 0.00000015 (str() of the Decimal: 1.50E-7).
    await service.handle_accepted([accepted("t1", "1", "ai_tokens", at=at, model="small", input_tokens=1),
                                   accepted("s1", "40", "storage_gb", at=at)])   # trialing: priced 0
    [debit] = [c for c in await published(bus) if c["kind"] == "usage.debit"]
    assert debit["payload"]["amount"] == "0.000000150"
    await end_period(service, NOV, DEC, JAN)
    [lines] = [c for c in await published(bus) if c["kind"] == "invoice.usage_lines"]
    assert {line["meter"]: line["amount"] for line in lines["payload"]["lines"]} == {
        "ai_tokens": "0.000000150", "storage_gb": "0.000000000"}   # was 1.50E-7 and 0E-9
    [close] = await service.db.fetch("SELECT line FROM close_lines WHERE meter = 'storage_gb'")
    assert json.loads(close["line"])["amount"] == "0.000000000"


def decisions(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    """event id -> (period, decision, amount) of rating's stored decisions."""
    return {r["event_id"]: (r["period"], r["decision"], r["amount_subunits"]) for r in rows}


async def test_usage_after_the_period_end_is_rated_in_the_next_period_before_rating_sees_it_end(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # Monthly in New York, anchored on the 31st: Jan 31 -> Feb 28 -> Mar 31 (local midnight; DST from Mar 14).
    start, feb28 = datetime(2027, 1, 31, 5, tzinfo=UTC), datetime(2027, 2, 28, 5, tzinfo=UTC)
    mar31, apr30 = datetime(2027, 3, 31, 4, tzinfo=UTC), datetime(2027, 4, 30, 4, tzinfo=UTC)
    await subscribe(service, started=start, period=(start, feb28), time_zone="America/New_York", anchor_day=31)
    # The ledger ended Jan 31 - Feb 28 already; rating has not seen it: March usage arrives first.
    await service.handle_accepted([accepted("e1", "120", at=datetime(2027, 3, 10, tzinfo=UTC)),
                                   accepted("e3", "10", at=datetime(2027, 3, 31, 4, 30, tzinfo=UTC))])
    await end_period(service, start, feb28, mar31, position=4)
    await service.handle_accepted([accepted("e2", "120", at=datetime(2027, 3, 20, tzinfo=UTC))])
    rows = await service.db.fetch("SELECT event_id, period, decision, amount_subunits FROM rated_events")
    # One allowance (100) for the 240 calls of Feb 28 - Mar 31: 2.00 then 12.00 (not 2.00 twice, from a fresh
    # allowance of calendar month 2027-03). Mar 31 04:30 UTC is 00:30 in New York: the period after.
    assert decisions(rows) == {"e1": (feb28.isoformat(), "priced", 2_000_000_000),
                               "e2": (feb28.isoformat(), "priced", 12_000_000_000),
                               "e3": (mar31.isoformat(), "priced", 0)}
    await end_period(service, feb28, mar31, apr30, position=5)
    assert usage_lines(await published(bus)) == {"api_calls": ("240", "14.000000000")}


async def test_usage_debits_name_the_time_zone_of_the_subscription_periods_that_bill_them(rating) -> None:  # type: ignore[no-untyped-def]
    """``cause.time_zone``: the monthly summaries put the usage in the month of its usage time there (the invoice's),
    which the projections cannot look up themselves. Not named for UTC, nor for calendar months (no subscription)."""
    service, bus = rating
    await service.handle_accepted([accepted("n1", "5", at=datetime(2026, 10, 31, 22, 30, tzinfo=UTC))])  # before it
    start, end = datetime(2026, 10, 31, 23, tzinfo=UTC), datetime(2026, 11, 30, 23, tzinfo=UTC)  # Berlin's November
    await subscribe(service, started=start, period=(start, end), time_zone="Europe/Berlin", anchor_day=1)
    await service.handle_accepted([accepted("b1", "5", at=datetime(2026, 11, 30, 23, 30, tzinfo=UTC)),  # Dec 1 local
                                   accepted("b2", "1", "ai_tokens", at=datetime(2026, 11, 10, tzinfo=UTC),
                                            model="small", input_tokens=1)])
    zones = {c["payload"]["cause"]["event_ids"][0]: c["payload"]["cause"].get("time_zone", "-")
             for c in await published(bus) if c["kind"] == "usage.debit"}
    assert zones == {"n1": "-", "b1": "Europe/Berlin", "b2": "Europe/Berlin"}


async def test_usage_debits_of_a_utc_subscription_name_no_time_zone(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service, time_zone="UTC")
    await service.handle_accepted([accepted("u1", "5", at=datetime(2026, 11, 30, 23, 30, tzinfo=UTC))])
    [debit] = [c for c in await published(bus) if c["kind"] == "usage.debit"]
    assert "time_zone" not in debit["payload"]["cause"]


async def test_an_older_period_end_delivered_again_does_not_move_the_period_back(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await end_period(service, NOV, DEC, JAN, position=4)
    await end_period(service, DEC, JAN, datetime(2027, 2, 1, tzinfo=UTC), position=5)
    november = (await published(bus))[0]
    await end_period(service, NOV, DEC, JAN, position=4)   # redelivered: its usage lines again, same id
    assert [c["command_id"] for c in await published(bus)][-1] == november["command_id"]
    # December is closed: a December event is late (priced on December's total, named as a late event of it: the
    # next renewal invoice bills it as December's overage), never taken for usage of an open December.
    await service.handle_accepted([accepted("d1", "150", at=datetime(2026, 12, 20, tzinfo=UTC))])
    rows = await service.db.fetch("SELECT event_id, period, decision, amount_subunits FROM rated_events")
    assert decisions(rows) == {"d1": (DEC.isoformat(), "late:priced", 5_000_000_000)}
    [debit] = [c for c in await published(bus) if c["kind"] == "usage.debit"]
    assert (debit["payload"]["cause"]["late"], debit["payload"]["cause"]["original_period"]) == ("late", DEC.isoformat())
    await end_period(service, JAN, datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC), position=6)
    assert usage_lines(await published(bus)) == {}


TEAM_ANNUAL = {"code": "team-annual", "name": "Team annual", "version": 1, "currency": "USD", "cadence": "year",
               "charges": [{"meter": "api_calls", "price": per_unit("0.10"), "included": "1000"},
                           {"meter": "storage_gb", "price": per_unit("0.20"), "included": "100"}]}


async def test_usage_before_a_change_that_restarts_the_period_is_on_the_next_invoice_once(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    catalog = LedgerEvent(position=3, aggregate_id=ids.catalog_id(), aggregate_version=4, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 3, "document": {**CATALOG, "plans": [TEAM, TEAM_ANNUAL]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 3, None, catalog.to_json())])
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("a1", "150", at=day(5)),                 # 50 x 0.10 = 5.00
                                   accepted("s1", "40", "storage_gb", at=day(6))])   # max, priced at close
    # Nov 15: monthly -> annual. The ledger restarts the period (Nov 15 2026 - Nov 15 2027).
    nov15, next_year = day(15), datetime(2027, 11, 15, tzinfo=UTC)
    changed = {"plan": {"code": "team-annual", "version": 1, "cadence": "year"}, "old_plan": {"code": "team",
               "version": 1}, "quantity": 1, "at": nov15.isoformat(), "period_start": nov15.isoformat(),
               "period_end": next_year.isoformat(), "anchor_day": 15}
    await subscription_event(service, "Changed", 4, **changed)
    # The cut period is closed at once at the monthly plan's price: storage (40 - 10) x 0.50.
    [close] = [c for c in await published(bus) if c["kind"] == "usage.debit" and c["payload"]["cause"].get("closed")]
    assert (close["payload"]["meter"], close["payload"]["amount"], close["payload"]["cause"]["period"]) == (
        "storage_gb", "15.000000000", NOV.isoformat())
    await subscription_event(service, "Changed", 4, **changed)   # redelivered: the same close debit again
    closes = [c for c in await published(bus) if c["kind"] == "usage.debit" and c["payload"]["cause"].get("closed")]
    assert [c["command_id"] for c in closes] == [close["command_id"]] * 2
    await service.handle_accepted([accepted("a2", "50", at=day(20)),   # the annual period: within its 1,000
                                   accepted("a0", "10", at=day(10))])  # late: of the cut period, priced there
    await end_period(service, nov15, next_year, datetime(2028, 11, 15, tzinfo=UTC), position=5)
    # The renewal invoice after the change carries the usage of the cut period too: 210 calls, 6.00 (a0's 10 calls
    # of Nov 10 at Team's price on the cut period's 150, 1.00, as on time; they were free in the annual allowance);
    # storage 15.00.
    assert usage_lines(await published(bus)) == {"api_calls": ("210", "6.000000000"),
                                                  "storage_gb": ("40", "15.000000000")}
    # ... and only that one.
    await end_period(service, next_year, datetime(2028, 11, 15, tzinfo=UTC), datetime(2029, 11, 15, tzinfo=UTC),
                     position=6)
    assert usage_lines(await published(bus)) == {}


async def test_an_immediate_cancel_closes_the_cut_period_and_sends_its_usage_lines_once(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("a1", "150", at=day(3)),                 # 50 x 0.10 = 5.00
                                   accepted("s1", "40", "storage_gb", at=day(5))])   # max, priced at close
    # Nov 16: canceled at once. The period ends there: closed at the plan's price, its usage lines sent for the
    # ledger's final draft, named by a period ending at the cancel.
    canceled = {"at": day(16).isoformat(), "by": "user:test", "reason": "canceled",
                "lines": [{"kind": "proration", "description": "Unused time", "amount": "-15.00"}]}
    await subscription_event(service, "Canceled", 4, **canceled)
    commands = await published(bus)
    assert [(c["kind"], c["payload"].get("meter")) for c in commands] == [
        ("usage.debit", "api_calls"), ("usage.debit", "storage_gb"), ("invoice.usage_lines", None)]
    close, lines = commands[1], commands[2]
    assert (close["payload"]["amount"], close["payload"]["cause"]["period"]) == ("15.000000000", NOV.isoformat())
    assert close["command_id"] == str(ids.command_id("usage.close", str(ids.account_id("acme")), "storage_gb", "",
                                                     NOV.isoformat()))
    assert (lines["payload"]["invoice_key"], lines["payload"]["period_start"], lines["payload"]["period_end"]) == (
        f"{SUBSCRIPTION}/{day(16).isoformat()}", NOV.isoformat(), day(16).isoformat())
    assert usage_lines(commands) == {"api_calls": ("150", "5.000000000"), "storage_gb": ("40", "15.000000000")}
    # Delivered again: the same close debit and usage lines (same ids, the ledger takes each once), no new close.
    await subscription_event(service, "Canceled", 4, **canceled)
    again = (await published(bus))[len(commands):]
    assert [c["command_id"] for c in again] == [c["command_id"] for c in commands[1:]]
    assert usage_lines(again) == usage_lines(commands)
    # The cut period is closed: its late events follow the late policy (not rated into it after its lines went).
    await service.handle_accepted([accepted("late", "10", at=day(10)),
                                   accepted("late-user", "1", "active_users", at=day(10), user="ann")])
    [late] = [c for c in await published(bus) if c["payload"].get("cause", {}).get("event_ids") == ["late"]]
    assert (late["payload"]["cause"]["late"], late["payload"]["cause"]["original_period"]) == ("late", NOV.isoformat())
    [letter] = await published(bus, topics.USAGE_REJECTED)
    assert (letter["event_id"], letter["reason"]) == ("late-user", "period_closed")


async def test_a_canceled_primary_subscription_is_closed_before_a_later_started_one(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await subscribe(service, plan="basic", subscription=UUID(int=7), started=datetime(2026, 11, 2, tzinfo=UTC))
    await service.handle_accepted([accepted("a1", "150", at=datetime(2026, 11, 3, tzinfo=UTC))])
    nov_16 = datetime(2026, 11, 16, tzinfo=UTC)
    await subscription_event(service, "Canceled", 4, at=nov_16.isoformat(), by="user:test", reason="canceled",
                             lines=[])
    # It was the primary subscription until the cancel: its final invoice carries the period's usage.
    assert usage_lines(await published(bus)) == {"api_calls": ("150", "5.000000000")}


async def test_usage_lines_say_whether_they_are_the_primary_subscriptions(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    secondary = UUID(int=7)
    await subscribe(service, plan="basic", subscription=secondary, started=datetime(2026, 11, 2, tzinfo=UTC))
    await service.handle_accepted([accepted("a1", "150", at=datetime(2026, 11, 3, tzinfo=UTC))])
    nov_16 = datetime(2026, 11, 16, tzinfo=UTC)
    await subscription_event(service, "Canceled", 4, secondary, at=nov_16.isoformat(), by="user:test",
                             reason="canceled", lines=[])
    # The secondary's final invoice: no usage, and the ledger is told to bill none of the account's overage there.
    [lines] = [c for c in await published(bus) if c["kind"] == "invoice.usage_lines"]
    assert (lines["payload"]["invoice_key"], lines["payload"]["lines"], lines["payload"]["primary"]) == (
        f"{secondary}/{nov_16.isoformat()}", [], False)
    await subscription_event(service, "Canceled", 5, at=nov_16.isoformat(), by="user:test", reason="canceled",
                             lines=[])
    [*_, primary] = [c for c in await published(bus) if c["kind"] == "invoice.usage_lines"]
    assert primary["payload"]["primary"] is True and usage_lines([primary]) == {"api_calls": ("150", "5.000000000")}


async def test_a_cancel_at_period_end_is_closed_once_by_its_period_end(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service)
    await service.handle_accepted([accepted("s1", "40", "storage_gb", at=datetime(2026, 11, 5, tzinfo=UTC))])
    await subscription_event(service, "CancelScheduled", 4, at=NOV.isoformat(), by="user:test",
                             cancel_at=DEC.isoformat())
    await subscription_event(service, "PeriodEnded", 5, period_start=NOV.isoformat(), period_end=DEC.isoformat(),
                             next_start=None, next_end=None)
    await subscription_event(service, "Canceled", 6, at=DEC.isoformat(), by="system:period_end",
                             reason="canceled_at_period_end", lines=[])
    commands = await published(bus)
    assert [c["kind"] for c in commands] == ["usage.debit", "invoice.usage_lines"]  # the period end's, only
    assert commands[1]["payload"]["invoice_key"] == f"{SUBSCRIPTION}/{DEC.isoformat()}"


async def test_the_cancel_of_an_incomplete_subscription_closes_nothing(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await subscribe(service, status="incomplete")  # never paid: its usage is priced by calendar month
    await service.handle_accepted([accepted("a1", "1", at=datetime(2026, 11, 3, tzinfo=UTC))])
    rated = len(await published(bus))  # a1's debit (of 0: within the allowance)
    await subscription_event(service, "Canceled", 4, at=datetime(2026, 11, 4, tzinfo=UTC).isoformat(),
                             by="user:test", reason="canceled", lines=[])
    assert [c["kind"] for c in (await published(bus))[rated:]] == []  # the ledger drafts no final invoice either


# -- usage at or after a trial's end, before the ledger's TrialConverted (or the trial's unconverted end) ------

NOV_15, DEC_15 = datetime(2026, 11, 15, tzinfo=UTC), datetime(2026, 12, 15, tzinfo=UTC)


async def start_trial(service: RatingService) -> None:
    """Trialing from Nov 1 (its period Nov 1 - Dec 1, as the ledger starts it), the trial ending on Nov 15."""
    await subscribe(service, status="trialing", trial_end=NOV_15.isoformat())


async def test_usage_after_the_trial_end_is_billed_in_the_first_paid_period_before_rating_sees_the_conversion(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await start_trial(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("t1", "150", at=day(10))])        # in the trial: free
    # The ledger converted the trial at Nov 15; rating has not seen TrialConverted: Nov 20 usage arrives first.
    await service.handle_accepted([accepted("a1", "150", at=day(20)),         # 100 included, 50 x 0.10 = 5.00
                                   accepted("s1", "40", "storage_gb", at=day(20))])
    await subscription_event(service, "TrialConverted", 4, at=NOV_15.isoformat(), by="system:trial",
                             period_start=NOV_15.isoformat(), period_end=DEC_15.isoformat(), anchor_day=15)
    await service.handle_accepted([accepted("a2", "50", at=day(25))])          # on the same total: 5.00 more
    debits = [c["payload"] for c in await published(bus) if c["kind"] == "usage.debit"]
    assert [(d["cause"]["event_ids"], d["amount"], d["cause"]["period"], d["cause"]["priced_by"]) for d in debits] == [
        (["t1"], "0.000000000", NOV.isoformat(), "plan"),  # trial usage: free, its quantity recorded
        (["a1"], "5.000000000", NOV_15.isoformat(), "plan"), (["a2"], "5.000000000", NOV_15.isoformat(), "plan")]
    rows = await service.db.fetch("SELECT event_id, period, decision, amount_subunits FROM rated_events")
    assert decisions(rows)["t1"] == (NOV.isoformat(), "trial", 0)
    # The first paid period's renewal invoice carries them, once: 200 calls (not 50), storage (40 - 10) x 0.50.
    await end_period(service, NOV_15, DEC_15, datetime(2027, 1, 15, tzinfo=UTC), position=5)
    commands = await published(bus)
    assert usage_lines(commands) == {"api_calls": ("200", "10.000000000"), "storage_gb": ("40", "15.000000000")}
    [lines] = [c for c in commands if c["kind"] == "invoice.usage_lines"]
    assert lines["payload"]["invoice_key"] == f"{SUBSCRIPTION}/{DEC_15.isoformat()}"


def debit_rows(commands: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None, str | None]]:
    """(kind, amount, period, what a repricing made of it) of each command, in the order sent."""
    return [(c["kind"], c["payload"].get("amount"), c["payload"].get("cause", {}).get("period"),
             (c["payload"].get("cause", {}).get("repriced") or {}).get("as")) for c in commands]


async def test_usage_after_a_trial_that_ends_unconverted_is_repriced_as_without_the_subscription(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await start_trial(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("a1", "150", at=day(16)),          # the plan's price: 5.00
                                   accepted("s1", "40", "storage_gb", at=day(16))])
    # No payment method: the ledger's tick ends the trial on Nov 16 (no billed period, no invoice).
    ended = {"at": day(16).isoformat(), "by": "system:trial", "reason": "trial_ended_without_payment_method",
             "lines": []}
    await subscription_event(service, "Canceled", 4, **ended)
    commands = (await published(bus))[1:]  # after a1's own debit
    # Usage since the trial's end (Nov 15) is priced as for an account without the subscription, as if the cancel had
    # reached rating first: a1 given back at the plan's price and charged at the list price in November (2 included,
    # 10 x 1.00 + 138 x 0.50); the storage moves to November's close (it was billed at the plan's price, 15.00, in a
    # period no invoice takes). The period the trial's end started is closed: nothing of it is left to bill.
    assert debit_rows(commands) == [
        ("usage.debit", "5.000000000", NOV_15.isoformat(), None),
        ("usage.debit", "-5.000000000", NOV_15.isoformat(), "give_back"),
        ("usage.debit", "79.000000000", "2026-11", "charge")]
    await subscription_event(service, "Canceled", 4, **ended)                 # redelivered: the same commands again
    assert [c["command_id"] for c in (await published(bus))[4:]] == [c["command_id"] for c in commands]
    assert await service.db.fetchval("SELECT count(*) FROM closed_periods WHERE period = $1", NOV_15.isoformat()) == 1
    # Afterwards: an account without a subscription (list price, calendar month), a1's 150 calls counted: 6.00.
    await service.handle_accepted([accepted("a2", "12", at=day(20))])
    [*_, later] = await published(bus)
    assert (later["payload"]["amount"], later["payload"]["cause"]["period"]) == ("6.000000000", "2026-11")
    [storage] = [line for line in await close_period(service.db, bus, service.catalog, "2026-11")
                 if line.meter == "storage_gb"]
    assert (storage.quantity, storage.amount, storage.event_ids) == ("40", "4.000000000", ["s1"])  # 40 x 0.10


async def test_a_trials_cancel_closes_the_usage_rated_after_its_trial_end_before_its_cut(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await start_trial(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    # The ledger canceled the trial at once on Nov 20, recorded before it ended trials first (a cancel after the
    # trial's end now converts or ends the trial first); rating rated usage of Nov 16, after the trial's end, before
    # the Canceled reached it: the plan's price, in the period the conversion would have started (Nov 15).
    await service.handle_accepted([accepted("a1", "150", at=day(16)),          # the plan's price: 5.00
                                   accepted("s1", "40", "storage_gb", at=day(16))])
    await subscription_event(service, "Canceled", 4, at=day(20).isoformat(), by="user:test", reason="canceled",
                             lines=[])
    commands = await published(bus)
    # Nov 16 is before the cut: that period is closed too (storage at the plan's price, (40 - 10) x 0.50, once left
    # unpriced), before the cut's usage lines finalize the ledger's final draft (which bills its overage).
    assert [(c["kind"], c["payload"].get("amount"), c["payload"].get("cause", {}).get("period")) for c in commands] == [
        ("usage.debit", "5.000000000", NOV_15.isoformat()), ("usage.debit", "15.000000000", NOV_15.isoformat()),
        ("invoice.usage_lines", None, None)]
    assert commands[-1]["payload"]["invoice_key"] == f"{SUBSCRIPTION}/{day(20).isoformat()}"
    await subscription_event(service, "Canceled", 4, at=day(20).isoformat(), by="user:test", reason="canceled",
                             lines=[])                                        # redelivered: the same commands
    assert [c["command_id"] for c in (await published(bus))[3:]] == [c["command_id"] for c in commands[1:]]


async def test_usage_after_a_trials_immediate_cancel_rated_before_it_is_repriced_before_its_cut(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await start_trial(service)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    # Canceled at once on Nov 10, in its trial; usage of Nov 16 rated before the Canceled reached rating (the plan's
    # price, in the period the trial's end would have started).
    await service.handle_accepted([accepted("a1", "150", at=day(16)), accepted("s1", "40", "storage_gb", at=day(16))])
    await subscription_event(service, "Canceled", 4, at=day(10).isoformat(), by="user:test", reason="canceled",
                             lines=[])
    commands = (await published(bus))[1:]  # after a1's own debit
    # After the cancel: no subscription, the list price in November (given back first); the cut's usage lines, on
    # the final draft, bill nothing of it (it used to be closed and billed at the plan's price, storage 15.00).
    assert debit_rows(commands) == [
        ("usage.debit", "5.000000000", NOV_15.isoformat(), None),
        ("usage.debit", "-5.000000000", NOV_15.isoformat(), "give_back"),
        ("usage.debit", "79.000000000", "2026-11", "charge"),
        ("invoice.usage_lines", None, None, None)]
    assert commands[-1]["payload"]["lines"] == []


async def test_a_close_prices_usage_after_the_pricing_subscriptions_trial_end_before_it_converts(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    # The primary subscription's plan has no storage charge; a second one, trialing until Nov 10, prices it.
    await subscribe(service, plan="basic")
    nov_10 = datetime(2026, 11, 10, tzinfo=UTC)
    await subscribe(service, status="trialing", subscription=UUID(int=7), started=datetime(2026, 11, 2, tzinfo=UTC),
                    trial_end=nov_10.isoformat())
    await service.handle_accepted([accepted("s1", "40", "storage_gb", at=datetime(2026, 11, 20, tzinfo=UTC))])
    # The primary's period ends before rating sees the second one's TrialConverted: its storage is not free.
    await end_period(service, NOV, DEC, JAN)
    assert usage_lines(await published(bus)) == {"storage_gb": ("40", "15.000000000")}


async def test_trial_usage_that_arrives_after_the_conversion_is_still_free(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await start_trial(service)
    await subscription_event(service, "TrialConverted", 4, at=NOV_15.isoformat(), by="system:trial",
                             period_start=NOV_15.isoformat(), period_end=DEC_15.isoformat(), anchor_day=15)
    # Usage of Nov 10 (in the trial) reaches rating late, after the conversion: trial usage, not the plan's price.
    await service.handle_accepted([accepted("t1", "150", at=datetime(2026, 11, 10, tzinfo=UTC)),
                                   accepted("a1", "150", at=datetime(2026, 11, 20, tzinfo=UTC))])
    debits = [c["payload"] for c in await published(bus) if c["kind"] == "usage.debit"]
    assert [(d["cause"]["event_ids"], d["amount"]) for d in debits] == [(["t1"], "0.000000000"), (["a1"], "5.000000000")]
    rows = await service.db.fetch("SELECT event_id, period, decision, amount_subunits FROM rated_events")
    assert decisions(rows)["t1"][1:] == ("trial", 0)
