"""The ingest service on its real embedded backends (SQLite + the durable embedded log)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
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


async def test_a_large_batch_is_deduplicated_in_one_pass_across_statement_chunks(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    await service.process([(usage(f"pre-{i}"), f"t:{i}") for i in range(0, 1500, 3)])  # every third, known
    batch = [(usage(f"pre-{i}"), f"u:{i}") for i in range(1500)] + [(usage("pre-1"), "u:again")]
    outcomes = await service.process(batch)
    statuses = [o.status for o in outcomes]
    assert statuses[:1500] == ["duplicate" if i % 3 == 0 else "accepted" for i in range(1500)]
    assert statuses[1500] == "duplicate"  # a duplicate inside the batch
    accepted = await published(bus, topics.USAGE_ACCEPTED)
    assert sorted(a["event"]["id"] for a in accepted) == sorted(f"pre-{i}" for i in range(1500))


class FailingBus:
    def __init__(self, inner: EmbeddedBus) -> None:
        self.inner = inner
        self.fail_next = False

    async def publish(self, messages: list[object]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker unavailable")
        await self.inner.publish(messages)  # type: ignore[arg-type]


async def test_a_batch_whose_publish_fails_is_forgotten_and_accepted_on_redelivery(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    failing = FailingBus(bus)
    service.bus = failing  # type: ignore[assignment]
    failing.fail_next = True
    try:
        await service.process([(usage("f1"), "t:0")])
    except ConnectionError:
        pass
    else:
        raise AssertionError("the publish failure must reach the consumer, which redelivers the batch")
    assert await service.db.fetch("SELECT * FROM seen_events") == []
    assert [o.status for o in await service.process([(usage("f1"), "t:0")])] == ["accepted"]
    assert [a["event"]["id"] for a in await published(bus, topics.USAGE_ACCEPTED)] == ["f1"]


async def test_cleanup_forgets_keys_older_than_the_window_and_is_bounded_per_run(tmp_path: Path) -> None:
    service, _bus = await make(tmp_path)
    service.settings = Settings(data_dir=tmp_path, dedup_cleanup_rows_max=4, dedup_cleanup_rows_per_run_max=10)
    old = (datetime.now(UTC) - timedelta(days=service.settings.dedup_window_days + 2)).isoformat()
    recent = datetime.now(UTC).isoformat()
    async with service.db.transaction() as conn:
        await conn.executemany("INSERT INTO seen_events (tenant, event_id, event_time, published) "
                               "VALUES ('acme', $1, $2, 1)", [(f"old-{i}", old) for i in range(25)]
                               + [(f"new-{i}", recent) for i in range(5)])
    assert await service.cleanup_once() == 10  # bounded per run
    assert await service.cleanup_once() == 10
    assert await service.cleanup_once() == 5
    assert await service.cleanup_once() == 0
    left = await service.db.fetch("SELECT event_id FROM seen_events ORDER BY event_id")
    assert [r["event_id"] for r in left] == [f"new-{i}" for i in range(5)]


async def test_an_event_whose_key_was_forgotten_comes_back_too_old_never_accepted(tmp_path: Path) -> None:
    service, _bus = await make(tmp_path)
    stale = json.dumps({"id": "s", "tenant": "acme", "meter": "api_calls", "quantity": "1",
                        "timestamp": (datetime.now(UTC) - timedelta(days=36)).isoformat()}).encode()
    assert [o.reason for o in await service.process([(stale, "t:0")])] == ["too_old"]
