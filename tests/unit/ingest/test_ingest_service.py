"""The ingest service on its real embedded backends (SQLite + the durable embedded log)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_ingest.service import IngestService
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.db import SqliteDatabase
from billing_runtime.settings import Settings


async def make(tmp_path: Path) -> tuple[IngestService, EmbeddedBus]:
    bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=2)
    await bus.start()
    db = await SqliteDatabase(tmp_path / "ingest.sqlite").connect()
    service = IngestService(Settings(data_dir=tmp_path), db, bus)
    await service.setup()
    learn = [
        LedgerEvent(position=1, aggregate_id="00000000-0000-0000-0000-000000000001", aggregate_version=1,
                    type="Catalog.Published", recorded_at=datetime.now(UTC),
                    data={"version": 1, "document": {"meters": [{"code": "api_calls"}]}}),
        LedgerEvent(position=2, aggregate_id="00000000-0000-0000-0000-000000000002", aggregate_version=1,
                    type="BillingAccount.Opened", recorded_at=datetime.now(UTC),
                    data={"tenant": "acme", "currency": "USD"}),
    ]
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, i, None, e.to_json())
                                        for i, e in enumerate(learn)])
    return service, bus


async def published(bus: EmbeddedBus, topic: str) -> list[dict[str, object]]:
    rows = await bus._db.fetch("SELECT value FROM messages WHERE topic = $1", topic)
    return [json.loads(bytes(r["value"])) for r in rows]


def usage(event_id: str) -> bytes:
    return json.dumps({"id": event_id, "tenant": "acme", "meter": "api_calls", "quantity": "2",
                       "timestamp": datetime.now(UTC).isoformat()}).encode()


async def test_duplicates_are_caught_across_a_restart(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    first = await service.process([(usage("a"), "t:0"), (usage("a"), "t:1"), (usage("b"), "t:2")])
    assert [o.status for o in first] == ["accepted", "duplicate", "accepted"]
    await service.db.close()
    await bus.stop()

    service, bus = await make(tmp_path)  # a new process on the same files
    again = await service.process([(usage("a"), "t:3"), (usage("c"), "t:4")])
    assert [o.status for o in again] == ["duplicate", "accepted"]
    accepted = await published(bus, topics.USAGE_ACCEPTED)
    assert sorted(a["event"]["id"] for a in accepted) == ["a", "b", "c"]


async def test_an_event_remembered_but_never_published_is_published_on_redelivery(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    # Simulate a crash after the dedup row was written but before the accepted record was published.
    await service.db.execute("INSERT INTO seen_events (tenant, event_id, event_time, published) "
                             "VALUES ('acme', 'z', '2026-11-21T00:00:00+00:00', 0)")
    outcome = await service.process([(usage("z"), "t:9")])
    assert [o.status for o in outcome] == ["accepted"]
    assert [a["event"]["id"] for a in await published(bus, topics.USAGE_ACCEPTED)] == ["z"]


async def test_every_rejection_is_dead_lettered_with_its_payload(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    outcomes = await service.process([(b"{bad", "t:0"), (usage("ok"), "t:1")])
    assert [o.status for o in outcomes] == ["rejected", "accepted"]
    letters = await published(bus, topics.USAGE_REJECTED)
    assert [(d["reason"], d["payload"]) for d in letters] == [("invalid_json", "{bad")]
