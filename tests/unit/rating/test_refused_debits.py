"""Usage debits the ledger refused (``block`` overage policy): rating takes their quantity out of the period's
running total and makes right, once, what it priced on the inflated total (``billing_rating.refusals``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_rating.close import close_period
from billing_rating.refusals import adjustment_command_id
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
