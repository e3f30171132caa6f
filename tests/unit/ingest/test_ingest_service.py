"""The ingest service on its real embedded backends (SQLite + the durable embedded log)."""

from __future__ import annotations

import gc
import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_ingest import service as service_module
from billing_ingest.service import IngestService, _collector_paused
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


def test_the_collector_is_paused_for_a_batch_and_restored_after_it() -> None:
    assert gc.isenabled()
    with _collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _collector_paused():
        raise RuntimeError("the batch failed")
    assert gc.isenabled()
    gc.disable()  # paused by someone else: left paused
    try:
        with _collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def poll(batch: list[bytes]) -> list[Record]:
    return [Record(topics.USAGE_RAW, 0, offset, b"acme", value) for offset, value in enumerate(batch)]


def test_a_poll_is_cut_in_equal_slices_of_a_useful_size() -> None:
    least = service_module.PIPELINE_SLICE_EVENTS_MIN
    assert service_module._slices(0) == [(0, 0)]
    assert service_module._slices(1) == [(0, 1)]
    assert service_module._slices(2 * least - 1) == [(0, 2 * least - 1)]  # two would be too small
    assert service_module._slices(2 * least) == [(0, least), (least, 2 * least)]
    for count in (500, 999, 1000, 2000, 4001):
        slices = service_module._slices(count)
        assert slices[0][0] == 0 and slices[-1][1] == count
        assert all(a[1] == b[0] for a, b in itertools.pairwise(slices))
        assert len(slices) <= service_module.PIPELINE_SLICES_MAX
        assert len(slices) == 1 or min(end - start for start, end in slices) >= least


async def test_a_poll_of_several_slices_publishes_in_order_and_catches_duplicates_across_slices(
        tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    count = 2000
    assert len(service_module._slices(count)) > 1
    batch = [usage(f"k-{i}") for i in range(count - 1)] + [usage("k-0")]  # the first event again, last slice
    await service.handle_raw(poll(batch))
    accepted = await published(bus, topics.USAGE_ACCEPTED)
    assert [a["event"]["id"] for a in accepted] == [f"k-{i}" for i in range(count - 1)]  # in the poll's order
    assert accepted[7]["source"] == f"kafka:{topics.USAGE_RAW}:0:7"
    await service.handle_raw(poll(batch))  # redelivered: every event is a duplicate now
    assert len(await published(bus, topics.USAGE_ACCEPTED)) == count - 1


class FailingOnCall:
    """A bus whose ``fail_on``-th publish (1-based) raises."""

    def __init__(self, inner: EmbeddedBus, fail_on: int) -> None:
        self.inner = inner
        self.calls = 0
        self.fail_on = fail_on

    async def publish(self, messages: list[object]) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise ConnectionError("broker unavailable")
        await self.inner.publish(messages)  # type: ignore[arg-type]


@pytest.mark.parametrize("failing_slice", [1, 2])
async def test_a_failed_slice_stops_the_slices_after_it_and_redelivery_publishes_each_event_once(
        tmp_path: Path, failing_slice: int) -> None:
    service, bus = await make(tmp_path)
    count = service_module.PIPELINE_SLICE_EVENTS_MIN * 2
    batch = [usage(f"p-{i}") for i in range(count)]
    service.bus = FailingOnCall(bus, failing_slice)  # type: ignore[assignment]
    with pytest.raises(ConnectionError):  # the failed slice's own error, not its followers'
        await service.handle_raw(poll(batch))
    published_ids = [a["event"]["id"] for a in await published(bus, topics.USAGE_ACCEPTED)]
    remembered = {r["event_id"] for r in await service.db.fetch("SELECT event_id FROM seen_events")}
    assert set(published_ids) == remembered  # a key is remembered exactly when it was published
    assert published_ids == ([f"p-{i}" for i in range(count // 2)] if failing_slice == 2 else [])

    service.bus = bus
    await service.handle_raw(poll(batch))  # the redelivery
    accepted = [a["event"]["id"] for a in await published(bus, topics.USAGE_ACCEPTED)]
    assert accepted == [f"p-{i}" for i in range(count)]  # each exactly once, in order


async def test_an_http_batch_is_never_sliced(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    count = service_module.PIPELINE_SLICE_EVENTS_MIN * 2
    service.bus = FailingOnCall(bus, 2)  # type: ignore[assignment]  # a second publish would fail
    outcomes = await service.process([(usage(f"h-{i}"), f"http:r:{i}") for i in range(count)])
    assert {o.status for o in outcomes} == {"accepted"}
    assert len(await published(bus, topics.USAGE_ACCEPTED)) == count


async def test_ledger_events_are_skipped_by_their_type_header_and_new_tenants_learned(tmp_path: Path) -> None:
    service, bus = await make(tmp_path)
    opened = LedgerEvent(position=3, aggregate_id="00000000-0000-0000-0000-000000000003", aggregate_version=1,
                         type="BillingAccount.Opened", recorded_at=datetime.now(UTC),
                         data={"tenant": "globex", "currency": "USD"})
    records = [
        # A usage debit is never decoded (its value here is not even JSON): the header says it is not ours.
        Record(topics.LEDGER_EVENTS, 0, 3, None, b"not json", (("type", b"BillingAccount.UsageDebited"),)),
        Record(topics.LEDGER_EVENTS, 0, 4, None, opened.to_json(), (("type", b"BillingAccount.Opened"),)),
    ]
    await service.handle_ledger_events(records)
    assert "globex" in service.knowledge.tenants
    await service.db.close()
    await bus.stop()


async def test_only_an_accounts_opening_teaches_a_tenant_whatever_the_other_account_events_are_named(
        tmp_path: Path) -> None:
    """Ingest matched account events by suffix (``...Opened``, ``...Created``), so a dispute's event (recorded as
    ``BillingAccount.DisputeOpened`` at first; it names no tenant) failed its ledger-events consumer for good: the
    partition stopped and tenants opened after it were never learned. Every other account event, with or without a
    type header, is passed over now."""
    from billing_ledger.domain.account import BillingAccount

    service, bus = await make(tmp_path)
    names = sorted(name for name, value in vars(BillingAccount).items() if isinstance(value, type)
                   and issubclass(value, BillingAccount.Event) and name not in ("Event", "Created", "Opened"))
    assert "DisputeRaised" in names
    others = [LedgerEvent(position=10 + i, aggregate_id="00000000-0000-0000-0000-000000000004", aggregate_version=2 + i,
                          type=f"BillingAccount.{name}", recorded_at=datetime.now(UTC), data={"key": "stripe/dp_1"})
              for i, name in enumerate([*names, "DisputeOpened"])]
    opened = LedgerEvent(position=9, aggregate_id="00000000-0000-0000-0000-000000000003", aggregate_version=1,
                         type="BillingAccount.Opened", recorded_at=datetime.now(UTC),
                         data={"tenant": "globex", "currency": "USD"})
    records = [Record(topics.LEDGER_EVENTS, 0, 3 + i, None, e.to_json(), headers)
               for i, (e, headers) in enumerate([
                   *[(e, (("type", e.type.encode()),)) for e in others],
                   *[(e, ()) for e in others],  # no type header: decoded to see
                   (opened, ())])]
    try:
        await service.handle_ledger_events(records)
        assert "globex" in service.knowledge.tenants
    finally:
        await service.db.close()
        await bus.stop()
