"""``billing projections rebuild``: drop the read models and replay ``billing.ledger.events`` from the start.

The source is the ledger's topic alone: Kafka (``KAFKA_BOOTSTRAP_SERVERS``) or the embedded log
(``<BILLING_DATA_DIR>/bus.sqlite``). The replay reads every partition from offset 0 up to the end offsets
seen when it started, through the same ``handle_ledger_events`` the live service uses (batched, positions
in the same transaction), then exits. It reads without a consumer group, so it commits nothing anywhere.
On PostgreSQL, worker processes replay shares of the partitions in parallel (``--workers``).

Rebuilding the live store needs the projections service stopped (or the target set to another schema /
file: compare, then switch).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics
from billing_projections.limits import (
    REBUILD_BATCH_RECORDS_MAX,
    REBUILD_FETCH_BYTES_MAX,
    REBUILD_GC_GEN0_THRESHOLD,
    REBUILD_METADATA_TIMEOUT_SECONDS,
    REBUILD_WORKERS_MAX,
)
from billing_projections.service import ProjectionService
from billing_projections.store import create_secondary_indexes
from billing_projections.tuning import gc_tuned, tune_gc
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


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, REBUILD_WORKERS_MAX))


async def rebuild(settings: Settings, *, schema: str | None = None, sqlite_path: Path | None = None,
                  batch_records_max: int = REBUILD_BATCH_RECORDS_MAX, workers: int | None = None) -> RebuildReport:
    """Drops the read models and replays the topic. With Kafka + PostgreSQL the partitions are shared out over
    ``workers`` processes (default: one per CPU), each replaying its own partitions in its own transactions:
    projecting is CPU-bound Python, so processes, not threads. Rows never span partitions (a tenant's account
    events share one), so the workers do not contend; each partition keeps its order and its position."""
    db, target = await open_target(settings, schema, sqlite_path)
    try:
        # Into empty tables: the secondary indexes are built once the rows are in (one sorted build each), not
        # maintained row by row during the replay.
        await ProjectionService(db).drop(secondary_indexes=False)
    except BaseException:
        await db.close()
        raise
    started = time.monotonic()
    if not settings.kafka_bootstrap_servers:
        try:
            events, partitions = await _replay(ProjectionService(db), _embedded_batches(
                settings.data_dir / "bus.sqlite", batch_records_max))
            await create_secondary_indexes(db)
        finally:
            await db.close()
        return RebuildReport(target, events, time.monotonic() - started, len(partitions))
    parts = await kafka_partitions(settings.kafka_bootstrap_servers, _topic(settings))
    if not settings.database_url:  # into a SQLite file: one writer
        try:
            events, _ = await _replay(ProjectionService(db), _kafka_batches(settings, batch_records_max, parts))
            await create_secondary_indexes(db)
        finally:
            await db.close()
        return RebuildReport(target, events, time.monotonic() - started, len(parts))
    await db.close()
    count = max(1, min(workers or default_workers(), len(parts) or 1))
    shares = [parts[i::count] for i in range(count)]
    if count == 1:
        with gc_tuned(REBUILD_GC_GEN0_THRESHOLD):
            events = await _replay_partitions(settings, schema, parts, batch_records_max)
    else:
        # This process replays the first share itself while the other workers replay theirs.
        started_workers = [asyncio.ensure_future(_start_worker(settings, schema, share, batch_records_max))
                           for share in shares[1:]]
        try:
            with gc_tuned(REBUILD_GC_GEN0_THRESHOLD):
                events = await _replay_partitions(settings, schema, shares[0], batch_records_max)
        finally:
            results = await asyncio.gather(*(worker for worker in started_workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        events += sum(int(r) for r in results if not isinstance(r, BaseException))
    db, _ = await open_target(settings, schema, None)
    try:
        await create_secondary_indexes(db, concurrency=count)  # one statement per worker's core
    finally:
        await db.close()
    return RebuildReport(target, events, time.monotonic() - started, len(parts))


def _start_worker(settings: Settings, schema: str | None, partitions: list[int], batch_records_max: int
                  ) -> Awaitable[int]:
    """A replay process for a share of the partitions, into the same (already emptied) tables; its number of
    events once it is done.

    Forked where the platform can (this process has imported everything already: a fresh interpreter would
    spend ~0.3 s importing before its first event, a large part of a rebuild of tens of thousands of events).
    The child starts its own event loop and its own connections, touches nothing it inherited, and leaves
    with ``os._exit`` (no inherited finalizer runs). Elsewhere ``python -m billing_projections.rebuild``."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return _worker(settings, schema, partitions, batch_records_max)
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(
        target=_forked_worker, args=(sender, settings, schema, partitions, batch_records_max), daemon=True)
    process.start()
    sender.close()
    return _forked_result(process, receiver, partitions)


def _forked_worker(sender: Connection, settings: Settings, schema: str | None, partitions: list[int],
                   batch_records_max: int) -> None:
    try:
        tune_gc(collect=False, gen0_threshold=REBUILD_GC_GEN0_THRESHOLD)
        sender.send(("ok", asyncio.run(_replay_partitions(settings, schema, partitions, batch_records_max))))
    except BaseException as exc:
        sender.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        sender.close()


async def _forked_result(process: BaseProcess, receiver: Connection, partitions: list[int]) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(receiver.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(receiver.fileno())
    try:
        status, found = receiver.recv()
    except EOFError:
        status, found = "error", "exited without a result"
    finally:
        receiver.close()
    await loop.run_in_executor(None, process.join)
    if status != "ok" or process.exitcode != 0:
        raise RuntimeError(f"rebuild worker for partitions {partitions} failed ({process.exitcode}): {found}")
    return int(found)


async def _worker(settings: Settings, schema: str | None, partitions: list[int], batch_records_max: int) -> int:
    """A replay process (``python -m billing_projections.rebuild``, its job on stdin) where there is no fork. A
    plain child process, not ``multiprocessing``'s spawn: that would import the caller's main module again."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing_projections.rebuild", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate(pickle.dumps((settings, schema, partitions, batch_records_max)))
    lines = out.decode(errors="replace").strip().splitlines()
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"rebuild worker for partitions {partitions} failed ({process.returncode}): "
                           f"{' | '.join(lines[-5:])}")
    return int(json.loads(lines[-1])["events"])


def _worker_main() -> None:
    settings, schema, partitions, batch_records_max = pickle.loads(sys.stdin.buffer.read())
    tune_gc(gen0_threshold=REBUILD_GC_GEN0_THRESHOLD)
    events = asyncio.run(_replay_partitions(settings, schema, partitions, batch_records_max))
    print(json.dumps({"events": events}), flush=True)


async def _replay_partitions(settings: Settings, schema: str | None, partitions: list[int],
                             batch_records_max: int) -> int:
    db, _ = await open_target(settings, schema, None)
    try:
        events, _ = await _replay(ProjectionService(db), _kafka_batches(settings, batch_records_max, partitions))
        return events
    finally:
        await db.close()


async def _replay(service: ProjectionService, batches: AsyncIterator[Sequence[Record | ConsumerRecord]]
                  ) -> tuple[int, set[int]]:
    events = 0
    partitions: set[int] = set()
    async for records in batches:
        # Positions are kept under the topic's own name (not the namespaced one the Kafka client's records carry).
        await service.handle_partitions([records], topic=topics.LEDGER_EVENTS)
        events += len(records)
        partitions.add(records[0].partition)
    return events, partitions


def _topic(settings: Settings) -> str:
    return f"{settings.namespace}.{topics.LEDGER_EVENTS}" if settings.namespace else topics.LEDGER_EVENTS


async def _kafka_batches(settings: Settings, batch_records_max: int, partitions: list[int]
                         ) -> AsyncIterator[list[ConsumerRecord]]:
    """Each partition's records up to the end offsets seen at the start, in batches: the Kafka client's records
    as they come (copying each into a ``Record`` cost a few percent of a replay's CPU)."""
    assert settings.kafka_bootstrap_servers
    topic = _topic(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed", max_poll_records=batch_records_max,
        fetch_max_bytes=REBUILD_FETCH_BYTES_MAX, max_partition_fetch_bytes=REBUILD_FETCH_BYTES_MAX // 4,
        request_timeout_ms=int(REBUILD_METADATA_TIMEOUT_SECONDS * 1000))
    await consumer.start()
    try:
        if not partitions:
            return
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        await consumer.seek_to_beginning(*assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        pending: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in assigned}
        while remaining:
            fetched = await consumer.getmany(*remaining, timeout_ms=1000, max_records=batch_records_max)
            for tp, raw in fetched.items():
                end = ends[tp]
                pending[tp] += raw if not raw or raw[-1].offset < end else [r for r in raw if r.offset < end]
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


if __name__ == "__main__":
    _worker_main()
