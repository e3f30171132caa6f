"""Usage debits the ledger refused (``block`` overage policy): rating takes their quantity out of the period's
running total and makes right, once, what it priced on the inflated total (``billing_rating.refusals``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_rating.charge_models import parse_spec
from billing_rating.close import close_period
from billing_rating.refusals import Debit, adjustment, adjustment_command_id
from billing_rating.service import RatingService
from billing_runtime.bus import EmbeddedBus, Record

from tests.unit.rating.support import embedded_rating
from tests.unit.rating.test_rating_service import accepted, correction, published

STAIRSTEP = {"model": "stairstep", "unit": "CREDIT",
             "steps": [{"up_to": "100", "amount": "500"}, {"up_to": None, "amount": "2000"}]}
CATALOG: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "meters": [
        {"code": "evidence_documents", "aggregation": "sum", "overage_policy": "block", "price": STAIRSTEP},
        {"code": "api_calls", "aggregation": "sum", "overage_policy": "block", "included": "100",
         "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
        {"code": "ai_tokens", "aggregation": "sum", "overage_policy": "block", "ai_prices": {
            "unit": "USD", "models": {"small": {"input": "0.15", "output": "0.60"}}}},
    ]}
ACCOUNT = ids.account_id("acme")
NOVEMBER = datetime(2026, 11, 21, 10, tzinfo=UTC)


@pytest.fixture
async def rating(tmp_path: Path) -> AsyncIterator[tuple[RatingService, EmbeddedBus]]:
    async with embedded_rating(tmp_path) as (service, bus):
        catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2,
                              type="Catalog.Published", recorded_at=datetime.now(UTC),
                              data={"version": 1, "document": CATALOG})
        await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
        yield service, bus


def refused(command: dict[str, Any], position: int) -> Record:
    """The ledger's ``UsageRejected`` of ``command`` (``BillingAccount.refuse_usage`` under ``block``), as relayed."""
    payload = command["payload"]
    event = LedgerEvent(position=position, aggregate_id=ACCOUNT, aggregate_version=position,
                        type="BillingAccount.UsageRejected", tenant="acme", recorded_at=datetime.now(UTC),
                        data={"command_id": command["command_id"], "meter": payload["meter"], "unit": payload["unit"],
                              "amount": payload["amount_subunits"], "reason": "insufficient_credit", "spendable": 0,
                              "cause": payload["cause"], "at": payload["at"]})
    return Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json(),
                  (("type", b"BillingAccount.UsageRejected"),))


def docs(event_id: str, quantity: str) -> Record:
    return accepted(event_id, quantity, "evidence_documents", at=NOVEMBER)


def by_event(commands: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["payload"]["cause"]["event_ids"][0]: c for c in commands if "refusal_of" not in c["payload"]["cause"]}


async def test_usage_after_a_refusal_is_priced_as_the_first_billed_usage_of_the_period(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([docs("doc-1", "10")])
    [first] = await published(bus)
    assert Decimal(first["payload"]["amount"]) == 500
    await service.handle_ledger_events([refused(first, 10)])
    await service.handle_accepted([docs("doc-2", "10")])
    commands = await published(bus)
    # doc-2's 10 documents are the first billed ones: the first step, 500 CREDIT (it was priced 0 as documents 11-20).
    assert Decimal(by_event(commands)["doc-2"]["payload"]["amount"]) == 500
    assert len(commands) == 2  # nothing was mispriced: no adjustment


async def test_a_refusal_learned_after_later_usage_was_priced_sends_one_adjustment(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([docs("doc-1", "10")])
    await service.handle_accepted([docs("doc-2", "10")])  # priced on 20 documents: 0 more
    first = by_event(await published(bus))["doc-1"]
    await service.handle_ledger_events([refused(first, 10)])
    await service.handle_ledger_events([refused(first, 10)])  # redelivered: the same adjustment again
    commands = await published(bus)
    adjustments = [c for c in commands if "refusal_of" in c["payload"]["cause"]]
    assert len(adjustments) == 2 and adjustments[0]["payload"] == adjustments[1]["payload"]
    adjustment = adjustments[0]
    assert adjustment["command_id"] == adjustment_command_id(str(ACCOUNT), "doc-1")
    assert adjustment["payload"]["overage_policy"] == "overage"
    assert adjustment["payload"]["cause"]["contribution"] == "0"
    # What the ledger posts for the period: doc-2's 0 and the adjustment, the price of the 10 accepted documents.
    posted = [c for c in commands if c["command_id"] != first["command_id"]][:2]
    assert sum(Decimal(c["payload"]["amount"]) for c in posted) == 500
    # The next 10 documents stay in the first step (20 accepted): nothing more, nothing given back twice.
    await service.handle_accepted([docs("doc-3", "10")])
    assert Decimal(by_event(await published(bus))["doc-3"]["payload"]["amount"]) == 0
    # The close counts the accepted documents only: 20 at the first step.
    [line] = await close_period(service.db, bus, service.catalog, "2026-11")
    assert (line.quantity, Decimal(line.amount)) == ("20", 500)


async def test_a_refused_debit_gives_the_included_allowance_back(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([accepted("big", "150", at=NOVEMBER)])  # 50 beyond 100 included: 5.00, refused
    [first] = await published(bus)
    await service.handle_ledger_events([refused(first, 10)])
    await service.handle_accepted([accepted("small", "80", at=NOVEMBER)])
    assert Decimal(by_event(await published(bus))["small"]["payload"]["amount"]) == 0  # within the allowance


async def test_the_decisions_trace_shows_a_refused_event_as_refused(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([docs("doc-1", "10")])
    [first] = await published(bus)
    await service.handle_ledger_events([refused(first, 10)])
    row = await service.db.fetchrow("SELECT decision FROM rated_events WHERE event_id = 'doc-1'")
    assert row["decision"] == "refused"
    # A correction of a refused event is refused too: nothing of it was billed to correct.
    await service.handle_accepted([correction("doc-1b", "doc-1", "5", meter="evidence_documents")])
    [dead] = await published(bus, topics.USAGE_REJECTED)
    assert dead["reason"] == "invalid_correction"


async def test_a_refused_ai_debit_takes_its_tokens_out_of_the_models_totals(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    call = {"model": "small", "operation": "chat", "input_tokens": 1000, "output_tokens": 500}
    await service.handle_accepted([accepted("a1", "1500", "ai_tokens", at=NOVEMBER, **call)])
    [first] = await published(bus)
    await service.handle_ledger_events([refused(first, 10)])
    await service.handle_accepted([accepted("a2", "1500", "ai_tokens", at=NOVEMBER, **call)])
    second = by_event(await published(bus))["a2"]
    assert second["payload"]["cause"]["tokens_before"] == {"input": "0", "output": "0"}
    assert second["payload"]["amount_subunits"] == first["payload"]["amount_subunits"]


async def test_a_refusal_reaching_rating_after_its_period_closed_is_made_right_by_a_late_adjustment(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    await service.handle_accepted([docs("doc-1", "10")])
    await service.handle_accepted([docs("doc-2", "10")])  # priced on 20 documents: 0 more
    first = by_event(await published(bus))["doc-1"]
    await close_period(service.db, bus, service.catalog, "2026-11")  # counted doc-1: 20 documents, 500
    await service.handle_ledger_events([refused(first, 10)])          # the refusal, after the close
    commands = await published(bus)
    [adjustment] = [c for c in commands if "refusal_of" in c["payload"]["cause"]]
    # The ledger holds 0 for November (doc-1 refused, doc-2 priced 0): the 10 accepted documents owe the first step.
    # Named as a late correction of November, the ledger bills it as overage of that period on the next invoice
    # (it used to be logged and left alone: November's 10 accepted documents were never billed).
    cause = adjustment["payload"]["cause"]
    assert (Decimal(adjustment["payload"]["amount"]), cause["period"], cause["original_period"], cause["late"]) == (
        500, "2026-11", "2026-11", "late")
    assert adjustment["payload"]["at"] == first["payload"]["at"]
    row = await service.db.fetchrow("SELECT decision FROM rated_events WHERE event_id = 'doc-1'")
    assert row["decision"] == "refused"
    totals = await service.db.fetchval("SELECT quantity FROM period_totals WHERE meter = 'evidence_documents'")
    assert totals == "10"  # a late correction of November is priced on its 10 accepted documents
    await service.handle_ledger_events([refused(first, 10)])          # redelivered: the same command again
    assert (await published(bus))[-1] == adjustment


PLANS_CATALOG: dict[str, Any] = {**CATALOG, "plans": [
    {"code": "team", "name": "Team", "currency": "USD", "version": 1, "charges": [
        {"meter": "api_calls", "overage_policy": "block", "included": "100",
         "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}}]},
    {"code": "scale", "name": "Scale", "currency": "USD", "version": 1, "charges": [
        {"meter": "api_calls", "overage_policy": "block", "included": "50",
         "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.05"}}]}]}
SUBSCRIPTION = UUID(int=42)
NOV_1, DEC_1 = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)


async def ledger_event(service: RatingService, kind: str, position: int, **data: Any) -> None:
    event = LedgerEvent(position=position, aggregate_id=SUBSCRIPTION, aggregate_version=position, recorded_at=NOV_1,
                        type=f"Subscription.{kind}", data=data)
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json())])


async def test_a_refusal_adjustment_prices_the_later_usage_at_the_price_it_was_rated_at(rating) -> None:  # type: ignore[no-untyped-def]
    service, bus = rating
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV_1, data={"version": 2, "document": PLANS_CATALOG})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 1, None, catalog.to_json())])
    await ledger_event(service, "Started", 1, tenant="acme", plan={"code": "team", "version": 1}, quantity=1,
                       status="active", started_at=NOV_1.isoformat(), period_start=NOV_1.isoformat(),
                       period_end=DEC_1.isoformat())
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    await service.handle_accepted([accepted("r1", "150", at=day(3), catalog_version=2)])  # Team: 50 x 0.10 = 5.00
    # Changed to Scale on Nov 8 (50 included, 0.05): Nov 10's 100 calls are priced on 150 -> 250, 5.00.
    await ledger_event(service, "Changed", 2, old_plan={"code": "team", "version": 1},
                       plan={"code": "scale", "version": 1}, old_quantity=1, quantity=1, at=day(8).isoformat(),
                       by="user:test", lines=[], period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat(),
                       anchor_day=1)
    await service.handle_accepted([accepted("a2", "100", at=day(10), catalog_version=2)])
    debits = by_event(await published(bus))
    assert (debits["r1"]["payload"]["amount"], debits["a2"]["payload"]["amount"]) == ("5.000000000", "5.000000000")
    await service.handle_ledger_events([refused(debits["r1"], 10)])  # r1's debit was refused (block)
    [adjustment] = [c for c in await published(bus) if "refusal_of" in c["payload"]["cause"]]
    # Without r1, a2's 100 calls are the period's first: 50 beyond Scale's 50 included, 2.50; the ledger holds 5.00:
    # 2.50 back. Priced at r1's price (Team's) the adjustment was period_charge(100) - (period_charge(250) - 5.00)
    # = 0.00 - 10.00: 10.00 back, more than a2 was charged.
    assert adjustment["payload"]["amount"] == "-2.500000000"


def debit(event_id: str, batch: int, before: str, after: str, amount: int, spec: Any, included: str = "0",
          refused: bool = False) -> Debit:
    return Debit(event_id, datetime(2026, 11, 1, batch, tzinfo=UTC), Decimal(before), Decimal(after), amount, spec,
                 Decimal(included), refused)


def test_the_refusal_adjustment_reprices_each_later_debit_at_its_own_price_and_composes() -> None:
    graduated = parse_spec({"model": "graduated", "unit": "USD", "tiers": [
        {"up_to": "100", "unit_amount": "1"}, {"up_to": None, "unit_amount": "0.50"}]})
    volume = parse_spec({"model": "volume", "unit": "USD", "tiers": [
        {"up_to": "100", "unit_amount": "2"}, {"up_to": None, "unit_amount": "1"}]})
    unit = 1_000_000_000
    # r (80) refused, then a (40, same batch, from 80 to 120) at the graduated price, then b (30, a later batch) at
    # the volume price of a new catalogue: 120 -> 150.
    r = debit("r", 1, "0", "80", 80 * unit, graduated, refused=True)
    a = debit("a", 1, "80", "120", 30 * unit, graduated)          # 20 x 1 + 20 x 0.50
    b = debit("b", 2, "120", "150", 30 * unit, volume)            # 150 x 1 - 120 x 1
    # Without r: a is 0 -> 40 (40.00), b 40 -> 70 at volume (140 - 80 = 60.00): 100.00 held as 60.00.
    assert adjustment([r, a, b], 0) == 40 * unit
    # A second refusal (b) learned after the first's adjustment was sent: b's 60.00 (priced without r) is not
    # held, a stays at 40.00; the ledger holds a's 30.00 + 40.00 sent: 30.00 back, a at 40.00 in all.
    assert adjustment([r, a, debit("b", 2, "120", "150", 30 * unit, volume, refused=True)], 40 * unit) == -30 * unit
    # A debit rated before the refused one is priced as it was; one of the same batch below it too.
    early = debit("early", 1, "0", "10", 10 * unit, graduated)
    late = debit("r", 1, "10", "90", 80 * unit, graduated, refused=True)
    assert adjustment([early, late], 0) == 0


def posted(commands: list[dict[str, Any]], event_id: str, refused: set[str]) -> Decimal:
    """What the ledger posts for ``event_id``: its usage debits (give-backs, repricings and adjustments included; a
    command sent again, same id, once) less those it refused."""
    amounts = {c["command_id"]: Decimal(c["payload"]["amount"]) for c in commands if c["kind"] == "usage.debit"
               and event_id in (c["payload"]["cause"].get("event_ids") or []) and c["command_id"] not in refused}
    return sum(amounts.values(), Decimal(0))


async def publish_plans(service: RatingService) -> None:
    catalog = LedgerEvent(position=2, aggregate_id=ids.catalog_id(), aggregate_version=3, type="Catalog.Published",
                          recorded_at=NOV_1, data={"version": 2, "document": PLANS_CATALOG})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 1, None, catalog.to_json())])


async def start_team(service: RatingService, position: int = 1) -> None:
    await ledger_event(service, "Started", position, tenant="acme", plan={"code": "team", "version": 1}, quantity=1,
                       status="active", started_at=NOV_1.isoformat(), period_start=NOV_1.isoformat(),
                       period_end=DEC_1.isoformat())


async def change_to_scale(service: RatingService, position: int) -> None:
    """Team to Scale (50 included, 0.05) on Nov 8, learnt by rating after usage it prices."""
    await ledger_event(service, "Changed", position, old_plan={"code": "team", "version": 1},
                       plan={"code": "scale", "version": 1}, old_quantity=1, quantity=1,
                       at=datetime(2026, 11, 8, tzinfo=UTC).isoformat(), by="user:test", lines=[],
                       period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat(), anchor_day=1)


async def test_a_refusal_learnt_after_a_repricing_gave_the_refused_debit_back_takes_that_give_back_back(rating) -> None:  # type: ignore[no-untyped-def]
    """Team (100 included, 0.10), 250 calls on Nov 10: 15.00, which the ledger refuses (block). Before rating reads the
    refusal, it learns of a change to Scale on Nov 8 and reprices the calls: 15.00 given back (Team's price), 10.00
    charged (Scale's: 200 x 0.05). The give-back credited the account 15.00 the ledger never posted: the calls cost
    it -5.00 in all (the refusal then failed, pricing a total below zero, and changed nothing). The refusal now takes
    that give-back back (+15.00), so the ledger holds the 10.00 Scale charge it posted, and nothing more; refused too,
    that charge leaves nothing."""
    service, bus = rating
    await publish_plans(service)
    await start_team(service)
    await service.handle_accepted([accepted("r1", "250", at=datetime(2026, 11, 10, tzinfo=UTC), catalog_version=2)])
    [first] = await published(bus)
    assert first["payload"]["amount"] == "15.000000000"
    await change_to_scale(service, 2)
    await service.handle_ledger_events([refused(first, 10)])
    commands = await published(bus)
    assert posted(commands, "r1", {first["command_id"]}) == Decimal("10.00")
    [adjustment] = [c for c in commands if "refusal_of" in c["payload"]["cause"]]
    # The give-back took 250 calls out of November's summary that the ledger never counted: the adjustment puts them
    # back, so the month shows the 250 calls the Scale charge billed.
    assert (adjustment["payload"]["amount"], adjustment["payload"]["cause"]["contribution"]) == ("15.000000000", "250")
    assert adjustment["payload"]["cause"]["event_ids"] == ["r1"]
    await service.handle_ledger_events([refused(first, 10)])  # redelivered: the same adjustment, nothing else
    assert (await published(bus))[len(commands):] == [adjustment]
    # The period's close counts the calls once, at Scale's price, as the ledger posted them.
    await ledger_event(service, "PeriodEnded", 3, period_start=NOV_1.isoformat(), period_end=DEC_1.isoformat(),
                       next_start=DEC_1.isoformat(), next_end=datetime(2027, 1, 1, tzinfo=UTC).isoformat())
    [lines] = [c for c in await published(bus) if c["kind"] == "invoice.usage_lines"]
    assert [(line["quantity"], line["amount"]) for line in lines["payload"]["lines"]] == [("250", "10.000000000")]


async def test_a_refused_repricing_charge_given_back_by_no_later_repricing(rating) -> None:  # type: ignore[no-untyped-def]
    """250 calls on Nov 10 rated at the list price before rating knew of the Team subscription (15.00, posted), then
    repriced by its Started: 15.00 given back, 15.00 charged at Team's price, a charge the ledger refuses (block). That
    refusal was ignored (its command is not the event's own), so a change to Scale learnt later repriced the calls
    again: 15.00 given back that the ledger never posted, 10.00 charged: -5.00 in all. The refused charge now takes the
    calls out of the period and no repricing moves them again: 0.00, the usage refused."""
    service, bus = rating
    await publish_plans(service)
    await service.handle_accepted([accepted("r1", "250", at=datetime(2026, 11, 10, tzinfo=UTC), catalog_version=2)])
    await start_team(service)
    commands = await published(bus)
    [charge] = [c for c in commands if c["payload"]["cause"].get("repriced", {}).get("as") == "charge"]
    assert charge["payload"]["amount"] == "15.000000000"
    await service.handle_ledger_events([refused(charge, 10)])
    await change_to_scale(service, 2)
    assert posted(await published(bus), "r1", {charge["command_id"]}) == 0
    row = await service.db.fetchrow("SELECT decision FROM rated_events WHERE event_id LIKE 'repriced-in:%'")
    assert row["decision"] == "refused"
    totals = await service.db.fetch("SELECT period, quantity FROM period_totals")
    assert {r["period"]: r["quantity"] for r in totals} == {"2026-11": "0", NOV_1.isoformat(): "0"}


def test_a_give_back_of_a_refused_debit_is_held_by_the_ledger_and_should_be_nothing() -> None:
    graduated = parse_spec({"model": "graduated", "unit": "USD", "tiers": [
        {"up_to": "100", "unit_amount": "1"}, {"up_to": None, "unit_amount": "0.50"}]})
    unit = 1_000_000_000
    moved = datetime(2026, 11, 1, 5, tzinfo=UTC)
    # e (80, refused) and f (40) rated together; a repricing (a later batch) gives back f, then e (the last added
    # first), each from the total the one before it left, before the refusal of e reached rating.
    e = debit("e", 1, "0", "80", 80 * unit, graduated, refused=True)
    f = debit("f", 1, "80", "120", 30 * unit, graduated)
    back_f = Debit("out-f", datetime(2026, 11, 1, 2, tzinfo=UTC), Decimal(120), Decimal(80), -30 * unit, graduated,
                   Decimal(0), False, rated_at=moved, repriced=True)
    back_e = Debit("out-e", datetime(2026, 11, 1, 2, tzinfo=UTC), Decimal(80), Decimal(0), -80 * unit, graduated,
                   Decimal(0), True, posted=True, rated_at=moved, repriced=True)
    # Without e, f cost 40.00 and its give-back 40.00 back: nothing should be held; the ledger holds f's 30.00 and both
    # give-backs, -80.00: 80.00, the give-back of what it never posted, is taken back.
    assert adjustment([e, f, back_f, back_e], 0) == 80 * unit
