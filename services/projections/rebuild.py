"""``billing projections rebuild``: drop the read models and replay ``billing.ledger.events`` from the start.

The source is the ledger's topic alone: Kafka (``KAFKA_BOOTSTRAP_SERVERS``) or the embedded log
(``<BILLING_DATA_DIR>/bus.sqlite``). The replay reads every partition from offset 0 up to the end offsets
seen when it started, through the same ``handle_ledger_events`` the live service uses (batched, positions
in the same transaction), then exits. It reads without a consumer group, so it commits nothing anywhere.

Rebuilding the live store needs the projections service stopped (or the target set to another schema /
file: compare, then switch).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics
from billing_projections.limits import (
    REBUILD_BATCH_RECORDS_MAX,
    REBUILD_FETCH_BYTES_MAX,
    REBUILD_METADATA_TIMEOUT_SECONDS,
)
from billing_projections.service import ProjectionService
from billing_runtime.bus import Record
from billing_runtime.db import Database, PostgresDatabase, SqliteDatabase
from billing_runtime.settings import Settings


@dataclass(frozen=True)
class RebuildReport:
    target: str
    events: int
    seconds: float
    partitions: int

    @property
    def events_per_second(self) -> int:
        return int(self.events / self.seconds) if self.seconds > 0 else 0

    def to_json(self) -> str:
        return json.dumps({"target": self.target, "events": self.events, "partitions": self.partitions,
                           "seconds": round(self.seconds, 3), "events_per_second": self.events_per_second})


async def open_target(settings: Settings, schema: str | None, sqlite_path: Path | None) -> tuple[Database, str]:
    if settings.database_url:
        name = schema or settings.schema("projections")
        return await PostgresDatabase(settings.database_url, name).connect(), f"postgresql schema {name}"
    path = sqlite_path or settings.data_dir / "projections.sqlite"
    return await SqliteDatabase(path).connect(), f"sqlite {path}"


async def rebuild(settings: Settings, *, schema: str | None = None, sqlite_path: Path | None = None,
                  batch_records_max: int = REBUILD_BATCH_RECORDS_MAX) -> RebuildReport:
    db, target = await open_target(settings, schema, sqlite_path)
    try:
        service = ProjectionService(db)
        await service.drop()
        started = time.monotonic()
        events = 0
        partitions: set[int] = set()
        batches = (_kafka_batches(settings, batch_records_max) if settings.kafka_bootstrap_servers
                   else _embedded_batches(settings.data_dir / "bus.sqlite", batch_records_max))
        async for records in batches:
            await service.handle_ledger_events(records)
            events += len(records)
            partitions.add(records[0].partition)
        return RebuildReport(target, events, time.monotonic() - started, len(partitions))
    finally:
        await db.close()


async def _kafka_batches(settings: Settings, batch_records_max: int) -> AsyncIterator[list[Record]]:
    assert settings.kafka_bootstrap_servers
    topic = f"{settings.namespace}.{topics.LEDGER_EVENTS}" if settings.namespace else topics.LEDGER_EVENTS
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed", max_poll_records=batch_records_max,
        fetch_max_bytes=REBUILD_FETCH_BYTES_MAX, max_partition_fetch_bytes=REBUILD_FETCH_BYTES_MAX // 4,
        request_timeout_ms=int(REBUILD_METADATA_TIMEOUT_SECONDS * 1000))
    await consumer.start()
    try:
        parts = await kafka_partitions(settings.kafka_bootstrap_servers, topic)
        if not parts:
            return
        assigned = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        await consumer.seek_to_beginning(*assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        pending: dict[TopicPartition, list[Record]] = {tp: [] for tp in assigned}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000, max_records=batch_records_max)
            for tp, raw in fetched.items():
                pending[tp] += [Record(topics.LEDGER_EVENTS, r.partition, r.offset, r.key, r.value or b"",
                                       tuple(r.headers or ())) for r in raw if r.offset < ends[tp]]
            for tp in sorted(remaining, key=lambda t: t.partition):
                done = await consumer.position(tp) >= ends[tp]
                # Full batches only (one transaction each), and the tail once the partition is read.
                while len(pending[tp]) >= batch_records_max or (done and pending[tp]):
                    yield pending[tp][:batch_records_max]
                    pending[tp] = pending[tp][batch_records_max:]
                if done:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def kafka_partitions(bootstrap_servers: str, topic: str) -> list[int]:
    """The topic's partitions ([] when it does not exist yet)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers,
                                request_timeout_ms=int(REBUILD_METADATA_TIMEOUT_SECONDS * 1000))
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = [t for t in described if t.get("topic") == topic and t.get("error_code") == 0]
    return sorted(int(p["partition"]) for t in found for p in t.get("partitions", ()))


async def _embedded_batches(path: Path, batch_records_max: int) -> AsyncIterator[list[Record]]:
    """Reads the embedded log file (``billing_runtime.bus.EmbeddedBus`` layout: ``messages`` table)."""
    if not path.exists():
        return
    log = await SqliteDatabase(path).connect()
    try:
        ends = {int(r["partition"]): int(r["end"]) for r in await log.fetch(
            'SELECT partition, MAX("offset") + 1 AS "end" FROM messages WHERE topic = $1 GROUP BY partition',
            topics.LEDGER_EVENTS)}
        for partition, end in sorted(ends.items()):
            offset = 0
            while offset < end:
                rows = await log.fetch(
                    'SELECT "offset", key, value, headers FROM messages WHERE topic = $1 AND partition = $2 '
                    'AND "offset" >= $3 AND "offset" < $4 ORDER BY "offset" LIMIT $5',
                    topics.LEDGER_EVENTS, partition, offset, end, batch_records_max)
                if not rows:
                    break
                yield [Record(topics.LEDGER_EVENTS, partition, int(r["offset"]),
                              r["key"].encode() if r["key"] else None, bytes(r["value"]),
                              tuple((k, v.encode()) for k, v in json.loads(r["headers"])))
                       for r in rows]
                offset = int(rows[-1]["offset"]) + 1
    finally:
        await log.close()
