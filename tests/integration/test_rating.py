"""Rating on the real stack: AI tokens for two models through Kafka, catalogue routes, period close; rating's
batch path on real PostgreSQL (COPY, array lookups, redelivery after the optimistic attempt, plans, late events)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.close import close_period
from billing_rating.service import RatingService
from billing_runtime.bus import Record
from billing_runtime.db import PostgresDatabase

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts, available, produce_raw, wait_balance
from tests.namespaces import scratch_namespace
from tests.support import auth, drop_schema, wait_until

pytestmark = pytest.mark.integration


def ai_event(tenant: str, event_id: str, model: str, user: str, input_tokens: int, output_tokens: int
             ) -> dict[str, object]:
    return {"id": event_id, "tenant": tenant, "meter": "ai_tokens", "quantity": str(input_tokens + output_tokens),
            "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"model": model, "operation": "chat", "user": user,
                           "input_tokens": input_tokens, "output_tokens": output_tokens}}


def test_ai_tokens_for_two_models_are_priced_per_model(stack: Stack, tmp_path: Path) -> None:
    tenant = f"ai-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    events = [
        ai_event(tenant, "ai-1", "gpt-4o", "ann", 10_000, 2_000),      # 0.025 + 0.020 = 0.045
        ai_event(tenant, "ai-2", "gpt-4o-mini", "bob", 100_000, 50_000),  # 0.015 + 0.030 = 0.045
        ai_event(tenant, "ai-3", "gpt-4o", "bob", 4_000, 1_000),       # 0.010 + 0.010 = 0.020
    ]
    asyncio.run(produce_raw(stack, events))
    wait_balance(stack, tenant, Decimal("100.00") - Decimal("0.110"))

    lines = wait_until(lambda: _decisions(stack, tenant), what="rating decisions")
    by_model: dict[str, Decimal] = {}
    for decision in lines:
        by_model[decision["model"]] = by_model.get(decision["model"], Decimal(0)) + Decimal(decision["amount"])
    assert by_model == {"gpt-4o": Decimal("0.065"), "gpt-4o-mini": Decimal("0.045")}


def _decisions(stack: Stack, tenant: str) -> list[dict[str, str]]:
    period = datetime.now(UTC).strftime("%Y-%m")
    r = httpx.get(f"{stack.rating_url}/v1/rating/periods/{period}/accounts/{tenant}/decisions",
                  headers=auth("viewer", tenant))
    r.raise_for_status()
    decisions = r.json()["decisions"]
    return decisions if len(decisions) == 3 else []


def test_catalogue_routes_show_packages_and_refuse_bad_catalogues(stack: Stack, tmp_path: Path) -> None:
    apply_accounts(stack, tmp_path, [f"cat-{uuid.uuid4().hex[:6]}"])
    packages = wait_until(lambda: httpx.get(f"{stack.rating_url}/v1/catalog/packages",
                                            headers=auth("viewer", "x")).json().get("packages"),
                          what="packages")
    bonus = next(p for p in packages if p["code"] == "credits-100")
    assert (bonus["effective_credits"], bonus["cost_per_credit"]) == ("110.00", "0.909091")
    bad = httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("admin"),
                     json={"meters": [{"code": "x", "price": {"model": "per_unit", "unit": "USD",
                                                              "unit_amount": "-1"}}]})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert "negative" in bad.json()["detail"]
    forbidden = httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("viewer", "x"), json={})
    assert forbidden.status_code == 403


def test_balance_unchanged_by_unpriced_model(stack: Stack, tmp_path: Path) -> None:
    tenant = f"aix-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    asyncio.run(produce_raw(stack, [ai_event(tenant, "u-1", "unknown-model", "ann", 10, 10),
                                    {"id": "m-1", "tenant": tenant, "meter": "api_calls", "quantity": "1",
                                     "timestamp": datetime.now(UTC).isoformat()}]))
    wait_balance(stack, tenant, Decimal("99.80"))
    assert available(stack, tenant) == Decimal("99.80")


# --- Rating's batch path on real PostgreSQL (arrays, COPY, the optimistic first attempt) ---------------------

PG_CATALOG: dict[str, Any] = {
    "meters": [
        {"code": "api_calls", "aggregation": "sum", "included": "2", "price": {
            "model": "graduated", "unit": "USD", "tiers": [{"up_to": "10", "unit_amount": "1.00"},
                                                          {"up_to": None, "unit_amount": "0.50"}]}},
        {"code": "seats", "aggregation": "last", "late_policy": "reject",
         "price": {"model": "per_unit", "unit": "USD", "unit_amount": "5"}},
        {"code": "storage_gb", "aggregation": "max", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}},
    ],
    "plans": [
        {"code": "pro", "name": "Pro", "currency": "USD", "version": 1, "charges": [
            {"meter": "api_calls", "included": "5", "price": {"model": "per_unit", "unit": "USD",
                                                              "unit_amount": "0.10"}}]},
        {"code": "tryout", "name": "Tryout", "currency": "USD", "version": 1, "trial_days": 14, "charges": [
            {"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}}]},
        {"code": "scale", "name": "Scale", "currency": "USD", "version": 1, "charges": [
            {"meter": "api_calls", "included": "20", "price": {"model": "per_unit", "unit": "USD",
                                                               "unit_amount": "0.05"}}]},
    ],
}
NOV = datetime(2026, 11, 21, 10, tzinfo=UTC)


class _Outbox:
    """A bus that keeps what rating publishes (topic, key, value, headers), in order."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def publish(self, messages: Any) -> None:
        self.messages.extend(messages)

    def commands(self) -> list[dict[str, Any]]:
        return [json.loads(m.value) for m in self.messages if m.topic == topics.LEDGER_COMMANDS]


@pytest.fixture
async def pg_rating(infra: dict[str, str]) -> AsyncIterator[tuple[RatingService, _Outbox]]:
    schema = f"{scratch_namespace()}_billing_rating"
    db = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    outbox = _Outbox()
    service = RatingService(db, outbox)  # type: ignore[arg-type]
    await service.setup()
    catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2, type="Catalog.Published",
                          recorded_at=NOV, data={"version": 1, "document": PG_CATALOG})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
    yield service, outbox
    await db.close()
    await drop_schema(infra["DATABASE_URL"], schema)  # created by this test


def usage(tenant: str, event_id: str, quantity: str, meter: str = "api_calls", at: datetime = NOV,
          correction_of: str | None = None) -> Record:
    event = UsageEvent(id=event_id, tenant=tenant, meter=meter, quantity=quantity, timestamp=at,
                       correction_of=correction_of)
    message = AcceptedUsage(account_id=ids.account_id(tenant), event=event, accepted_at=NOV, source="test",
                            catalog_version=1)
    return Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())


async def test_postgres_redelivery_republishes_the_same_commands_and_counts_once(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    first = [usage("acme", "e1", "5"), usage("acme", "e2", "5"), usage("beta", "b1", "20")]
    await service.handle_accepted(first)
    before = list(outbox.messages)
    assert [Decimal(c["payload"]["amount"]) for c in outbox.commands()] == [Decimal(3), Decimal(5), Decimal(14)]
    # Redelivered with a new event in the middle: the optimistic attempt meets the primary key and the batch is
    # rated again with the lookup; the stored commands go out again, byte for byte, the new one is rated once.
    outbox.messages.clear()
    await service.handle_accepted([first[0], usage("acme", "e3", "1"), first[1], first[2], first[0]])
    again = outbox.messages
    assert [m.value for m in again[:1] + again[2:4]] == [m.value for m in before]
    assert again[4].value == before[0].value  # a duplicate within the batch: the same decision again
    assert all(m.headers == (("schema", b"ledger.command/v1"),) for m in again)
    new = json.loads(again[1].value)
    assert (new["payload"]["cause"]["quantity_before"], new["payload"]["amount"]) == ("10", "1.000000000")
    totals = {(r["account_id"], r["meter"]): r["quantity"] for r in await service.db.fetch(
        "SELECT account_id, meter, quantity FROM period_totals")}
    assert totals == {(str(ids.account_id("acme")), "api_calls"): "11", (str(ids.account_id("beta")), "api_calls"): "20"}
    assert await service.db.fetchval("SELECT count(*) FROM rated_events") == 4


async def test_postgres_corrections_late_events_and_closed_periods(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    october = datetime(2026, 10, 20, tzinfo=UTC)
    await service.handle_accepted([usage("acme", "o1", "12", at=october), usage("acme", "s1", "3", "seats", october)])
    await close_period(service.db, outbox, service.catalog, "2026-10")  # type: ignore[arg-type]
    outbox.messages.clear()
    # The correction is rated in its original's (closed) period, on October's total (12 -> 20: 10 billable ->
    # 18, +4.00), named by it; a late new event follows the late policy (next_period): priced on October's total
    # too (20 -> 29: 9 x 0.50), named by it, billed as October's overage by the next invoice.
    await service.handle_accepted([usage("acme", "c1", "20", correction_of="o1"),
                                   usage("acme", "late", "9", at=october),          # 20 -> 29: 9 billable
                                   usage("acme", "s2", "4", "seats", october),       # reject: period_closed
                                   usage("acme", "c2", "1", correction_of="nope")])  # unknown_correction
    commands = outbox.commands()
    assert [(c["payload"]["cause"]["event_ids"], c["payload"]["amount"]) for c in commands] == [
        (["c1"], "4.000000000"), (["late"], "4.500000000")]
    assert commands[0]["payload"]["cause"]["late"] == "late"
    assert commands[0]["payload"]["cause"]["corrects"] == "o1"
    assert [(c["payload"]["cause"]["period"], c["payload"]["cause"]["original_period"]) for c in commands] == [
        ("2026-10", "2026-10"), ("2026-10", "2026-10")]
    letters = [json.loads(m.value) for m in outbox.messages if m.topic == topics.USAGE_REJECTED]
    assert [(d["event_id"], d["reason"]) for d in letters] == [("s2", "period_closed"), ("c2", "unknown_correction")]
    decisions = {r["event_id"]: r["decision"] for r in await service.db.fetch(
        "SELECT event_id, decision FROM rated_events")}
    assert decisions["c1"] == decisions["late"] == "late:priced"


async def test_postgres_plan_pricing_pools_allowances_and_trials_are_free(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    events = []
    for position, (tenant, plan, status) in enumerate([("acme", "pro", "active"), ("acme", "pro", "active"),
                                                        ("tria", "tryout", "trialing")]):
        events.append(LedgerEvent(
            position=10 + position, aggregate_id=uuid.uuid4(), aggregate_version=1, type="Subscription.Started",
            recorded_at=NOV, data={"tenant": tenant, "plan": {"code": plan, "version": 1}, "quantity": 1,
                                   "status": status, "started_at": f"2026-11-0{position + 1}T00:00:00+00:00",
                                   "period_start": "2026-11-01T00:00:00+00:00",
                                   "period_end": "2026-12-01T00:00:00+00:00"}))
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, i, None, e.to_json())
                                        for i, e in enumerate(events)])
    await service.handle_accepted([usage("acme", "p1", "8"), usage("acme", "p2", "4"), usage("tria", "t1", "50")])
    commands = outbox.commands()
    # Two Pro subscriptions pool 5 + 5 included: 8 -> 0, 12 -> 2 x 0.10; the trial is recorded, not charged. What
    # costs nothing goes to the ledger as a debit of 0 (the month's usage summary counts its quantity).
    assert [(c["payload"]["cause"]["event_ids"], c["payload"]["amount"]) for c in commands] == [
        (["p1"], "0.000000000"), (["p2"], "0.200000000"), (["t1"], "0.000000000")]
    cause = commands[1]["payload"]["cause"]
    assert (cause["priced_by"], cause["included"], cause["period"]) == ("plan", "10", "2026-11-01T00:00:00+00:00")
    assert cause["price"] == {"model": "per_unit", "unit": "USD", "unit_amount": "0.1"}  # the parsed spec, dumped
    decisions = {r["event_id"]: r["decision"] for r in await service.db.fetch(
        "SELECT event_id, decision FROM rated_events")}
    assert decisions == {"p1": "priced", "p2": "priced", "t1": "trial"}


async def test_postgres_an_error_mid_batch_keeps_nothing_of_it(pg_rating, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    rate = service._rate
    calls = []

    def failing(batch: Any, usage: Any, **kwargs: Any) -> Any:
        calls.append(usage.event.id)
        if usage.event.id == "e2":
            raise RuntimeError("boom")
        return rate(batch, usage, **kwargs)

    monkeypatch.setattr(service, "_rate", failing)
    with pytest.raises(RuntimeError, match="boom"):  # the bus retries the batch later
        await service.handle_accepted([usage("acme", "e1", "5"), usage("acme", "e2", "5")])
    assert outbox.messages == []
    assert await service.db.fetchval("SELECT count(*) FROM rated_events") == 0  # the COPY's rows rolled back
    assert await service.db.fetchval("SELECT count(*) FROM period_totals") == 0
    monkeypatch.setattr(service, "_rate", rate)
    await service.handle_accepted([usage("acme", "e1", "5"), usage("acme", "e2", "5")])
    assert [c["payload"]["amount"] for c in outbox.commands()] == ["3.000000000", "5.000000000"]


async def test_postgres_an_event_too_costly_for_an_amount_is_dead_lettered_and_the_batch_rated(pg_rating) -> None:  # type: ignore[no-untyped-def]
    """50,000,000,000 calls cost 25,000,000,004.50 USD, beyond a signed 64-bit sub-unit amount: PostgreSQL refused
    the COPY (out of int64 range) and the batch was retried for ever. Now that event alone is dead-lettered; the
    others are rated, and a redelivery (the optimistic attempt meets the primary key) sends the same again."""
    service, outbox = pg_rating
    batch = [usage("acme", "e1", "5"), usage("acme", "huge", "50000000000"), usage("beta", "b1", "3")]
    await service.handle_accepted(batch)
    letters = [json.loads(m.value) for m in outbox.messages if m.topic == topics.USAGE_REJECTED]
    assert [(letter["event_id"], letter["reason"]) for letter in letters] == [("huge", "no_price")]
    assert "64-bit" in letters[0]["detail"]
    assert [Decimal(c["payload"]["amount"]) for c in outbox.commands()] == [Decimal(3), Decimal(1)]
    first = list(outbox.messages)
    outbox.messages.clear()
    await service.handle_accepted([*batch, usage("acme", "e2", "1")])
    assert [m.value for m in outbox.messages[:3]] == [m.value for m in first]
    assert json.loads(outbox.messages[3].value)["payload"]["cause"]["quantity_before"] == "5"  # huge counts nothing


def subscription_record(subscription: uuid.UUID, position: int, kind: str, **data: Any) -> Record:
    """The relayed ledger event ``Subscription.<kind>`` of ``subscription`` at ``position``."""
    event = LedgerEvent(position=position, aggregate_id=subscription, aggregate_version=position, recorded_at=NOV,
                        type=f"Subscription.{kind}", data=data)
    return Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json())


async def started_pro_subscription(service: Any, subscription: uuid.UUID, start: datetime, end: datetime,
                                   tenant: str = "acme") -> Any:
    """Feeds rating a ``Subscription.Started`` (plan pro, period [start, end)); returns the function that feeds
    the same subscription's next events: ``await ledger_event(position, kind, **data)``."""

    async def ledger_event(position: int, kind: str, **data: Any) -> None:
        await service.handle_ledger_events([subscription_record(subscription, position, kind, **data)])

    await ledger_event(1, "Started", tenant=tenant, plan={"code": "pro", "version": 1}, quantity=1, status="active",
                       started_at=start.isoformat(), period_start=start.isoformat(), period_end=end.isoformat())
    return ledger_event


async def test_postgres_a_subscription_period_closes_when_it_ends_and_later_events_of_it_are_late(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec, jan = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    subscription = uuid.uuid4()

    ledger_event = await started_pro_subscription(service, subscription, nov, dec)
    await service.handle_accepted([usage("acme", "a1", "8"), usage("acme", "s1", "3", "seats")])  # 3 x 0.10
    await ledger_event(2, "PeriodEnded", period_start=nov.isoformat(), period_end=dec.isoformat(),
                       next_start=dec.isoformat(), next_end=jan.isoformat())
    *_, seats, lines = outbox.commands()
    # Pro has no seats charge: the list price, 3 x 5.00, debited at close before the usage lines.
    assert (seats["payload"]["meter"], seats["payload"]["amount"]) == ("seats", "15.000000000")
    assert {line["meter"]: line["amount"] for line in lines["payload"]["lines"]} == {
        "api_calls": "0.300000000", "seats": "15.000000000"}
    outbox.messages.clear()
    # After the renewal, November usage is late: priced on November's total (billed as its overage by the next
    # renewal), or refused (seats: reject).
    await service.handle_accepted([usage("acme", "late", "7", at=datetime(2026, 11, 30, tzinfo=UTC)),
                                   usage("acme", "s2", "4", "seats", datetime(2026, 11, 30, tzinfo=UTC))])
    [late] = outbox.commands()  # November's allowance was used (8 of 5 included): 7 x 0.10, never December's
    assert (late["payload"]["amount"], late["payload"]["cause"]["period"], late["payload"]["cause"]["late"]) == (
        "0.700000000", nov.isoformat(), "late")
    letters = [json.loads(m.value) for m in outbox.messages if m.topic == topics.USAGE_REJECTED]
    assert [(d["event_id"], d["reason"]) for d in letters] == [("s2", "period_closed")]
    outbox.messages.clear()
    # A correction of November's a1 (8 -> 3) is priced on November's total (15, the late 7 in it) at the price it was
    # billed at (its close line): 10 billable -> 5, 0.50 back, named by November; December's total is untouched.
    await service.handle_accepted([usage("acme", "a1-fix", "3", correction_of="a1")])
    [fix] = outbox.commands()
    cause = fix["payload"]["cause"]
    assert (fix["payload"]["amount"], cause["period"], cause["original_period"], cause["corrects"]) == (
        "-0.500000000", nov.isoformat(), nov.isoformat(), "a1")
    totals = {r["period"]: r["quantity"] for r in await service.db.fetch("SELECT period, quantity FROM period_totals")}
    assert totals == {nov.isoformat(): "10"}


async def test_postgres_an_immediate_cancel_closes_the_cut_period_once_and_later_events_of_it_are_late(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec, nov_16 = (datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC),
                        datetime(2026, 11, 16, tzinfo=UTC))
    subscription = uuid.uuid4()

    ledger_event = await started_pro_subscription(service, subscription, nov, dec)
    await service.handle_accepted([usage("acme", "a1", "8", at=datetime(2026, 11, 3, tzinfo=UTC)),
                                   usage("acme", "s1", "3", "seats", datetime(2026, 11, 3, tzinfo=UTC))])
    outbox.messages.clear()
    canceled = {"at": nov_16.isoformat(), "by": "user:test", "reason": "canceled", "lines": []}
    await ledger_event(2, "Canceled", **canceled)
    first = outbox.commands()
    assert [(c["kind"], c["payload"].get("meter")) for c in first] == [("usage.debit", "seats"),
                                                                        ("invoice.usage_lines", None)]
    assert first[1]["payload"]["invoice_key"] == f"{subscription}/{nov_16.isoformat()}"
    assert {line["meter"]: line["amount"] for line in first[1]["payload"]["lines"]} == {
        "api_calls": "0.300000000", "seats": "15.000000000"}
    outbox.messages.clear()
    await ledger_event(2, "Canceled", **canceled)  # redelivered: the same commands, the same ids
    assert [c["command_id"] for c in outbox.commands()] == [c["command_id"] for c in first]
    outbox.messages.clear()
    await service.handle_accepted([usage("acme", "s2", "4", "seats", datetime(2026, 11, 10, tzinfo=UTC))])
    letters = [json.loads(m.value) for m in outbox.messages if m.topic == topics.USAGE_REJECTED]
    assert [(d["event_id"], d["reason"]) for d in letters] == [("s2", "period_closed")]


# -- a usage batch racing a subscription period's close (different consumers, different transactions) ----------

RACE_WAIT_MS = 500  # how long the racing side keeps its transaction open (the other side must wait for it)


def _period_ended(subscription: uuid.UUID, start: datetime, end: datetime, next_end: datetime) -> Record:
    return subscription_record(subscription, 2, "PeriodEnded", period_start=start.isoformat(),
                               period_end=end.isoformat(), next_start=end.isoformat(), next_end=next_end.isoformat())


async def _subscribed(service: RatingService, tenant: str) -> uuid.UUID:
    """A subscription to pro for November 2026, as rating learns of it."""
    subscription = uuid.uuid4()
    await started_pro_subscription(service, subscription, datetime(2026, 11, 1, tzinfo=UTC),
                                   datetime(2026, 12, 1, tzinfo=UTC), tenant)
    return subscription


async def test_postgres_a_usage_batch_during_a_period_close_waits_and_bills_late(pg_rating, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec, jan = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    subscription = await _subscribed(service, "acme")
    await service.handle_accepted([usage("acme", "a1", "8", at=datetime(2026, 11, 20, tzinfo=UTC))])
    close, racing = service._period_ended, []

    async def close_then_a_batch(conn: Any, ended: Any) -> Any:
        outputs = await close(conn, ended)  # November closed, its lines taken; not committed yet
        racing.append(asyncio.create_task(service.handle_accepted([usage("acme", "a2", "4",
                                                                        at=datetime(2026, 11, 25, tzinfo=UTC))])))
        await asyncio.sleep(RACE_WAIT_MS / 1000)  # the other side runs now, or waits for this one
        return outputs

    monkeypatch.setattr(service, "_period_ended", close_then_a_batch)
    await service.handle_ledger_events([_period_ended(subscription, nov, dec, jan)])
    await racing[0]
    # November was invoiced without a2; a2 is late: priced on November's closed total (8 -> 12, 5 included) as a late
    # event of it (``original_period``), which the ledger bills as November's overage on the next renewal invoice,
    # never counted in November's lines already taken.
    rows = await service.db.fetch("SELECT event_id, period, decision FROM rated_events WHERE event_id = 'a2'")
    assert [(r["period"], r["decision"]) for r in rows] == [(nov.isoformat(), "late:priced")]
    [a2] = [c for c in outbox.commands() if c["kind"] == "usage.debit" and c["payload"]["cause"]["event_ids"] == ["a2"]]
    assert (a2["payload"]["amount"], a2["payload"]["cause"]["original_period"]) == ("0.400000000", nov.isoformat())
    november = [c for c in outbox.commands() if c["kind"] == "invoice.usage_lines"][-1]
    assert [(line["meter"], line["quantity"]) for line in november["payload"]["lines"]] == [("api_calls", "8")]


async def test_postgres_a_period_close_during_a_usage_batch_waits_and_counts_it(pg_rating, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec, jan = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    subscription = await _subscribed(service, "acme")
    await service.handle_accepted([usage("acme", "a1", "8", at=datetime(2026, 11, 20, tzinfo=UTC))])
    decide, racing = service._decide, []

    async def decide_then_a_close(*args: Any) -> Any:
        async for row in decide(*args):
            yield row
        # The batch has rated a2 into November; not committed yet: the period ends now.
        racing.append(asyncio.create_task(service.handle_ledger_events([_period_ended(subscription, nov, dec, jan)])))
        await asyncio.sleep(RACE_WAIT_MS / 1000)  # the other side runs now, or waits for this one

    monkeypatch.setattr(service, "_decide", decide_then_a_close)
    await service.handle_accepted([usage("acme", "a2", "4", at=datetime(2026, 11, 25, tzinfo=UTC))])
    await racing[0]
    # The close counted a2: November's invoice shows 12 calls, 7 x 0.10 beyond the 5 included.
    november = [c for c in outbox.commands() if c["kind"] == "invoice.usage_lines"][-1]
    assert [(line["meter"], line["quantity"], line["amount"]) for line in november["payload"]["lines"]] == [
        ("api_calls", "12", "0.700000000")]


# -- usage rated before rating learns of its subscription (two topics, no order between them) ------------------

def _tryout_started(subscription: uuid.UUID, tenant: str = "acme") -> Record:
    """The trial of plan tryout from Nov 1 (its period Nov 1 - Dec 1, its trial ending on Nov 15)."""
    return subscription_record(subscription, 1, "Started", tenant=tenant, plan={"code": "tryout", "version": 1},
                               quantity=1, status="trialing", started_at="2026-11-01T00:00:00+00:00",
                               period_start="2026-11-01T00:00:00+00:00", period_end="2026-12-01T00:00:00+00:00",
                               trial_end="2026-11-15T00:00:00+00:00")


def _net_charged(outbox: _Outbox) -> int:
    """What the ledger posts of the usage debits sent: each command once (by its id)."""
    debits = {c["command_id"]: c for c in outbox.commands() if c["kind"] == "usage.debit"}
    return sum(int(c["payload"]["amount_subunits"]) for c in debits.values())


async def test_postgres_trial_usage_rated_before_its_started_is_given_back_once(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    await service.handle_accepted([usage("acme", "t1", "150", at=datetime(2026, 11, 10, tzinfo=UTC))])
    assert _net_charged(outbox) == 79_000_000_000  # the list price: 2 included, 10 x 1.00 + 138 x 0.50
    started = _tryout_started(uuid.uuid4())
    await service.handle_ledger_events([started])
    assert _net_charged(outbox) == 0  # given back in November, charged 0 in the trial's period
    sent = list(outbox.messages)
    await service.handle_ledger_events([started])  # redelivered: the same commands, nothing repriced again
    assert [m.value for m in outbox.messages[len(sent):]] == [m.value for m in sent[1:]]  # t1's again, back, charge
    assert await service.db.fetchval("SELECT count(*) FROM rated_events") == 3
    totals = {r["period"]: r["quantity"] for r in await service.db.fetch("SELECT period, quantity FROM period_totals")}
    assert totals == {"2026-11": "0", "2026-11-01T00:00:00+00:00": "150"}


async def test_postgres_a_started_during_a_usage_batch_waits_for_it_and_reprices_it(pg_rating, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    decide, racing = service._decide, []

    async def decide_then_a_started(*args: Any) -> Any:
        async for row in decide(*args):
            yield row
        # The batch has rated t1 at the list price (no subscription yet); not committed: the trial starts now.
        racing.append(asyncio.create_task(service.handle_ledger_events([_tryout_started(uuid.uuid4())])))
        await asyncio.sleep(RACE_WAIT_MS / 1000)  # the other side runs now, or waits for this one

    monkeypatch.setattr(service, "_decide", decide_then_a_started)
    await service.handle_accepted([usage("acme", "t1", "150", at=datetime(2026, 11, 10, tzinfo=UTC))])
    await racing[0]
    # The Started waited for the batch and repriced t1 (without waiting it read no decision and t1 kept 79.00).
    assert _net_charged(outbox) == 0


async def test_postgres_a_usage_batch_during_a_repricing_waits_and_rates_with_the_subscription(pg_rating, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    await service.handle_accepted([usage("acme", "t1", "150", at=datetime(2026, 11, 10, tzinfo=UTC))])
    reprice, racing = service._reprice, []

    async def reprice_then_a_batch(*args: Any) -> Any:
        outputs = await reprice(*args)  # t1 repriced; the Started not committed yet: t2 arrives now
        racing.append(asyncio.create_task(service.handle_accepted([usage("acme", "t2", "50",
                                                                         at=datetime(2026, 11, 12, tzinfo=UTC))])))
        await asyncio.sleep(RACE_WAIT_MS / 1000)
        return outputs

    monkeypatch.setattr(service, "_reprice", reprice_then_a_batch)
    await service.handle_ledger_events([_tryout_started(uuid.uuid4())])
    await racing[0]
    rows = await service.db.fetch("SELECT period, decision FROM rated_events WHERE event_id = 't2'")
    assert [(r["period"], r["decision"]) for r in rows] == [("2026-11-01T00:00:00+00:00", "trial")]
    assert _net_charged(outbox) == 0


def test_usage_published_before_its_subscription_exists_is_repriced_when_it_starts(stack: Stack, tmp_path: Path
                                                                                   ) -> None:
    tenant = f"early-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    now = datetime.now(UTC)
    asyncio.run(produce_raw(stack, [{"id": "early-1", "tenant": tenant, "meter": "api_calls", "quantity": "50",
                                     "timestamp": now.isoformat()}]))
    wait_balance(stack, tenant, Decimal("90.00"))  # rated before any subscription: the list price, 50 x 0.20
    # The starter trial, started an hour before that usage (the ledger's Started reaches rating after the usage).
    created = httpx.post(f"{stack.ledger_url}/v1/accounts/{tenant}/subscriptions", headers=auth("admin"),
                         json={"key": "main", "plan": "starter", "at": (now - timedelta(hours=1)).isoformat()},
                         timeout=30)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "trialing"
    wait_balance(stack, tenant, Decimal("100.00"))  # trial usage: the 10.00 given back, nothing charged


def _net_by_event(outbox: _Outbox) -> dict[str, int]:
    """What the ledger posts per usage event (each command once, by its id; a repricing's by the event it amends)."""
    net: dict[str, int] = {}
    for command in {c["command_id"]: c for c in outbox.commands() if c["kind"] == "usage.debit"}.values():
        cause = command["payload"]["cause"]
        event = cause.get("corrects") or cause["event_ids"][0]
        net[event] = net.get(event, 0) + int(command["payload"]["amount_subunits"])
    return net


async def test_postgres_usage_is_priced_by_the_plan_of_its_time_and_repriced_by_a_cancel_learnt_late(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    day = lambda d: datetime(2026, 11, d, tzinfo=UTC)
    subscription = uuid.uuid4()
    ledger_event = await started_pro_subscription(service, subscription, nov, dec)
    await ledger_event(2, "Changed", old_plan={"code": "pro", "version": 1}, plan={"code": "scale", "version": 1},
                       old_quantity=1, quantity=1, at=day(10).isoformat(), by="user:test", lines=[],
                       period_start=nov.isoformat(), period_end=dec.isoformat(), anchor_day=1)
    # Usage of Nov 5 reaching rating after the change is priced by Pro (5 included, 0.10): 3 x 0.10; Nov 12's by
    # Scale (20 included): 0. Nov 20's too, before rating learns that the subscription was canceled on Nov 16: Scale
    # prices the period's 23 calls 0.15 (3 x 0.05), less than the 0.30 Pro charged before the change, which counts
    # as paid towards it (docs/rating.md "Which price applies": it cost 0.15 more, on top).
    await service.handle_accepted([usage("acme", "u1", "8", at=day(5)), usage("acme", "u2", "10", at=day(12)),
                                   usage("acme", "u3", "5", at=day(20))])
    assert _net_by_event(outbox) == {"u1": 300_000_000, "u2": 0, "u3": 0}
    await ledger_event(3, "Canceled", at=day(16).isoformat(), by="user:test", reason="canceled", lines=[])
    # u3 is priced as without the subscription (November's list price: 2 included, 3 x 1.00) and is not on the cut's
    # final invoice, which bills Nov 1 - 16: 18 calls, 0.30.
    assert _net_by_event(outbox) == {"u1": 300_000_000, "u2": 0, "u3": 3_000_000_000}
    [lines] = [c for c in outbox.commands() if c["kind"] == "invoice.usage_lines"]
    assert [(line["meter"], line["quantity"], line["amount"]) for line in lines["payload"]["lines"]] == [
        ("api_calls", "18", "0.300000000")]
    first = [c["command_id"] for c in outbox.commands()][-4:]  # u3's own debit, its give-back, charge, usage lines
    await ledger_event(3, "Canceled", at=day(16).isoformat(), by="user:test", reason="canceled", lines=[])
    assert [c["command_id"] for c in outbox.commands()][-4:] == first  # redelivered: the same commands again
    assert _net_by_event(outbox) == {"u1": 300_000_000, "u2": 0, "u3": 3_000_000_000}


def _usage_rejected(tenant: str, command: dict[str, Any], position: int) -> Record:
    """The ledger's ``UsageRejected`` of ``command`` (a ``block`` overage policy), as relayed."""
    payload = command["payload"]
    event = LedgerEvent(position=position, aggregate_id=ids.account_id(tenant), aggregate_version=position,
                        type="BillingAccount.UsageRejected", tenant=tenant, recorded_at=NOV,
                        data={"command_id": command["command_id"], "meter": payload["meter"], "unit": payload["unit"],
                              "amount": payload["amount_subunits"], "reason": "insufficient_credit", "spendable": 0,
                              "cause": payload["cause"], "at": payload["at"]})
    return Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json(),
                  (("type", b"BillingAccount.UsageRejected"),))


async def test_postgres_a_refusal_learnt_after_its_period_closed_is_adjusted_as_a_late_correction(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    october = datetime(2026, 10, 20, tzinfo=UTC)
    # 2 included, then 10 at 1.00, then 0.50: o1 12 calls, 10.00; o2 5 more, 2.50. October is closed, then the
    # ledger's refusal of o1 reaches rating.
    await service.handle_accepted([usage("acme", "o1", "12", at=october), usage("acme", "o2", "5", at=october)])
    first = next(c for c in outbox.commands() if c["payload"]["cause"]["event_ids"] == ["o1"])
    await close_period(service.db, outbox, service.catalog, "2026-10")  # type: ignore[arg-type]
    outbox.messages.clear()
    await service.handle_ledger_events([_usage_rejected("acme", first, 50)])
    [adjustment] = outbox.commands()
    # Without o1, o2's 5 calls are October's first: 3 x 1.00; the ledger holds 2.50: 0.50 more, billed as overage
    # of October by the next invoice (it was logged and left alone).
    cause = adjustment["payload"]["cause"]
    assert (adjustment["payload"]["amount"], cause["period"], cause["original_period"], cause["late"],
            cause["refusal_of"]) == ("0.500000000", "2026-10", "2026-10", "late", first["command_id"])
    rows = {r["event_id"]: r["decision"] for r in await service.db.fetch("SELECT event_id, decision FROM rated_events")}
    assert rows == {"o1": "refused", "o2": "priced"}
    assert await service.db.fetchval("SELECT quantity FROM period_totals WHERE period = '2026-10'") == "5"


async def test_postgres_a_late_peak_corrects_its_own_closed_month_never_the_open_one(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    await service.handle_accepted([usage("acme", "g1", "40", "storage_gb", datetime(2026, 10, 20, tzinfo=UTC))])
    await close_period(service.db, outbox, service.catalog, "2026-10")  # type: ignore[arg-type]
    await service.handle_accepted([usage("acme", "g2", "10", "storage_gb", NOV)])
    outbox.messages.clear()
    # October's peak was 60 GB, not the 40 its close billed (4.00): 2.00 more, named by October; November's peak stays
    # 10 GB (it was 60: the late reading counted in the open month).
    await service.handle_accepted([usage("acme", "late", "60", "storage_gb", datetime(2026, 10, 25, tzinfo=UTC))])
    [late] = outbox.commands()
    cause = late["payload"]["cause"]
    assert (late["payload"]["amount"], cause["period"], cause["original_period"], cause["contribution"]) == (
        "2.000000000", "2026-10", "2026-10", "20")
    [november] = [line for line in await close_period(service.db, outbox, service.catalog, "2026-11")  # type: ignore[arg-type]
                  if line.meter == "storage_gb"]
    assert (november.quantity, november.amount) == ("10", "1.000000000")


async def test_postgres_a_refusal_learnt_after_a_repricing_takes_its_give_back_back(pg_rating) -> None:  # type: ignore[no-untyped-def]
    service, outbox = pg_rating
    nov, dec = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)
    ledger_event = await started_pro_subscription(service, uuid.uuid4(), nov, dec)
    # Pro (5 included, 0.10): 30 calls of Nov 12, 2.50, which the ledger refuses; rating learns first of a change to
    # Scale (20 included, 0.05) on Nov 10: 2.50 given back, 0.50 charged. The refusal takes the give-back's 2.50 back
    # (it was never posted): the ledger holds the 0.50 it posted (it held -2.00).
    await service.handle_accepted([usage("acme", "u1", "30", at=datetime(2026, 11, 12, tzinfo=UTC))])
    [first] = outbox.commands()
    await ledger_event(2, "Changed", old_plan={"code": "pro", "version": 1}, plan={"code": "scale", "version": 1},
                       old_quantity=1, quantity=1, at=datetime(2026, 11, 10, tzinfo=UTC).isoformat(), by="user:test",
                       lines=[], period_start=nov.isoformat(), period_end=dec.isoformat(), anchor_day=1)
    await service.handle_ledger_events([_usage_rejected("acme", first, 50)])
    net = _net_by_event(outbox)
    assert net["u1"] - int(first["payload"]["amount_subunits"]) == 500_000_000
    rows = {r["event_id"][:12]: r["decision"] for r in await service.db.fetch(
        "SELECT event_id, decision FROM rated_events")}
    assert rows == {"u1": "refused", "repriced-out": "refused", "repriced-in:": "priced"}
