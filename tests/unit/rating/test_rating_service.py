"""The rating service on its real embedded backends: real-time increments, decisions, redelivery."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.service import CatalogBehind, RatingService
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.db import SqliteDatabase

GRADUATED = {"model": "graduated", "unit": "USD", "tiers": [
    {"up_to": "10", "unit_amount": "1.00"}, {"up_to": None, "unit_amount": "0.50"}]}


async def make(tmp_path: Path) -> tuple[RatingService, EmbeddedBus]:
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=1)
    await bus.start()
    service = RatingService(await SqliteDatabase(tmp_path / "rating.sqlite").connect(), bus)
    await service.setup()
    catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2, type="Catalog.Published",
                          recorded_at=datetime.now(UTC), data={"version": 1, "document": {"meters": [
                              {"code": "api_calls", "aggregation": "sum", "price": GRADUATED, "included": "2"}]}})
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
    return service, bus


def accepted(event_id: str, quantity: str, catalog_version: int = 1) -> Record:
    event = UsageEvent(id=event_id, tenant="acme", meter="api_calls", quantity=quantity,
                       timestamp=datetime(2026, 11, 21, 10, tzinfo=UTC))
    message = AcceptedUsage(account_id=ids.account_id("acme"), event=event, accepted_at=datetime.now(UTC),
                            source="test", catalog_version=catalog_version)
    return Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())


async def commands(bus: EmbeddedBus) -> list[dict[str, object]]:
    rows = await bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"',
                               topics.LEDGER_COMMANDS)
    return [json.loads(bytes(r["value"])) for r in rows]


async def test_tiered_charges_stay_exact_mid_period_with_allowance_first(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    # 2 included, then 10 at 1.00, then 0.50: events of 5, 5, 5 -> totals 5, 10, 15 -> billable 3, 8, 13
    for i, q in enumerate(["5", "5", "5"]):
        await service.handle_accepted([accepted(f"e{i}", q)])
    from decimal import Decimal

    amounts = [Decimal(c["payload"]["amount"]) for c in await commands(bus)]  # type: ignore[index]
    assert amounts == [Decimal("3"), Decimal("5"), Decimal("3.5")]
    assert sum(int(c["payload"]["amount_subunits"]) for c in await commands(bus)) == 11_500_000_000  # type: ignore[index]
    await service.db.close()
    await bus.stop()


async def test_a_redelivered_event_republishes_the_same_command(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    await service.handle_accepted([accepted("e1", "4")])
    await service.handle_accepted([accepted("e1", "4")])
    first, second = await commands(bus)
    assert first == second
    assert UUID(str(first["command_id"])) == ids.usage_command_id("acme", "e1")
    cause = first["payload"]["cause"]  # type: ignore[index]
    assert (cause["quantity_before"], cause["quantity_after"], cause["event_ids"]) == ("0", "4", ["e1"])


async def test_an_event_validated_against_a_newer_catalogue_waits(tmp_path: Path) -> None:
    service, _ = await make(tmp_path)
    with pytest.raises(CatalogBehind):
        await service.handle_accepted([accepted("e1", "1", catalog_version=2)])
