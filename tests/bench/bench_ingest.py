"""Ingest throughput, raw -> accepted, through real Kafka + PostgreSQL with dedup on (a plain script; pytest
does not collect it).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_ingest.py [--events 200000] [--batch 500] [--duplicates 0.01]

1. A child process produces ``--events`` raw usage events to ``billing.usage.raw`` of a fresh namespace
   (``--tenants`` tenants, a share of exact duplicates and of bad events), so the ingest process's memory
   is its own.
2. Ingest learns the catalogue through its own handler (``handle_ledger_events``), then its Kafka consumer
   runs in this process (``billing_runtime.runner.Runner`` with ``KafkaBus`` + PostgreSQL, exactly
   ``billing serve ingest`` without HTTP) until every good event is on ``billing.usage.accepted`` and every
   bad one on ``billing.usage.rejected`` (watched through end offsets, which costs the measured process
   nothing per record).
3. Reported: events/s from start (consumer group join included) and in steady state (first accepted to
   last), CPU of this process per event, peak RSS and RSS along the run (and its growth over the second
   half: memory must not grow with traffic); then the accepted topic is read back and its set of event ids
   must equal the set of good ids sent, with no id twice.
4. ``--expired-rows N`` first fills the dedup table with N keys of events older than the dedup window: the
   service's cleanup (bounded per statement and per run) must forget them while the stream runs, so the
   table ends holding the keys of the window only (reported: rows deleted, expired rows left, rows at the
   end). For a long sustained run: ``--events 500000 --expired-rows 200000``.

Target: >= 20,000 events/s on a 2-core machine. The namespace's topics and schema are deleted at the end
(``--keep`` keeps them).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import os
import random
import resource
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_ingest import dedup
from billing_ingest.app import build
from billing_ingest.service import DEDUP_FORGOTTEN, IngestService
from billing_runtime.bus import KafkaBus, Record, ensure_topics
from billing_runtime.db import open_database
from billing_runtime.logging import configure_logging
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings

METERS = [{"code": "api_calls"}, {"code": "ai_tokens", "required_properties": ["model", "operation"]}]
TIMEOUT_SECONDS = 900


def raw_event(run: str, index: int, tenant: str, now: datetime) -> dict[str, object]:
    at = (now - timedelta(milliseconds=index % 5000)).isoformat()
    if index % 3 == 0:
        return {"id": f"{run}-{index:09d}", "tenant": tenant, "meter": "ai_tokens", "quantity": str(100 + index % 900),
                "timestamp": at, "properties": {"model": "gpt-4o-mini", "operation": "chat", "user": f"u{index % 50}"}}
    return {"id": f"{run}-{index:09d}", "tenant": tenant, "meter": "api_calls", "quantity": str(1 + index % 20),
            "timestamp": at, "properties": {"endpoint": "/v1/search"}}


def stream(run: str, events: int, tenants: int, duplicates: float, bad: float):  # type: ignore[no-untyped-def]
    """Yields (key, value, kind) with kind good | duplicate | bad, deterministic for ``run``."""
    rng = random.Random(run)
    now = datetime.now(UTC)
    sent: list[bytes] = []
    for i in range(events):
        tenant = f"t{rng.randrange(tenants)}"
        roll = rng.random()
        if sent and roll < duplicates:
            value = sent[rng.randrange(len(sent))] if rng.random() < 0.5 else sent[-1]
            yield json.loads(value)["tenant"].encode(), value, "duplicate"
        elif roll < duplicates + bad:
            yield tenant.encode(), json.dumps({"id": f"{run}-bad-{i}", "tenant": tenant, "meter": "api_calls",
                                               "quantity": "-1", "timestamp": now.isoformat()}).encode(), "bad"
        else:
            value = json.dumps(raw_event(run, i, tenant, now), separators=(",", ":")).encode()
            if len(sent) < 10_000:
                sent.append(value)
            yield tenant.encode(), value, "good"


def produce(bootstrap: str, topic: str, run: str, events: int, tenants: int, duplicates: float, bad: float,
            result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> dict[str, int]:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20,
                                    enable_idempotence=True)
        await producer.start()
        counts = {"good": 0, "duplicate": 0, "bad": 0}
        try:
            pending = []
            for key, value, kind in stream(run, events, tenants, duplicates, bad):
                counts[kind] += 1
                pending.append(await producer.send(topic, value, key=key))
                if len(pending) >= 20_000:
                    await asyncio.gather(*pending)
                    pending.clear()
            await asyncio.gather(*pending)
        finally:
            await producer.stop()
        return counts

    started = time.perf_counter()
    counts = asyncio.run(main())
    counts["produce_seconds"] = round(time.perf_counter() - started, 2)  # type: ignore[assignment]
    result.put(counts)


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def end_total(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> int:
    offsets = await consumer.end_offsets(partitions)
    return sum(offsets.values())


async def learn_catalogue(settings: Settings, tenants: int) -> None:
    """Ingest's own handler learns the meters and accounts (the records the ledger would relay)."""
    db = await open_database("ingest", settings)
    service = IngestService(settings, db, bus=None)  # type: ignore[arg-type]  # learning publishes nothing
    await service.setup()
    now = datetime.now(UTC)
    events = [LedgerEvent(position=1, aggregate_id=uuid.uuid4(), aggregate_version=1, type="Catalog.Published",
                          recorded_at=now, data={"version": 1, "document": {"meters": METERS}})]
    events += [LedgerEvent(position=2 + t, aggregate_id=uuid.uuid4(), aggregate_version=1,
                           type="BillingAccount.Opened", recorded_at=now, data={"tenant": f"t{t}", "currency": "USD"})
               for t in range(tenants)]
    await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, i, None, e.to_json())
                                        for i, e in enumerate(events)])
    await db.close()


async def read_accepted(bootstrap: str, topic: str) -> tuple[set[str], int]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, max_partition_fetch_bytes=8 << 20)
    await consumer.start()
    ids: set[str] = set()
    total = 0
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        expected = await end_total(consumer, parts)
        while total < expected:
            for records in (await consumer.getmany(timeout_ms=1000, max_records=50_000)).values():
                for record in records:
                    ids.add(json.loads(record.value)["event"]["id"])
                    total += 1
    finally:
        await consumer.stop()
    return ids, total


async def seed_expired_keys(settings: Settings, rows: int) -> None:
    """``rows`` dedup keys of events two days beyond the window (and its cleanup margin): all expired."""
    db = await open_database("ingest", settings)
    try:
        moment = datetime.now(UTC) - timedelta(days=settings.dedup_window_days) - dedup.CLEANUP_MARGIN
        chunk_rows = 10_000
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            async with db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO seen_events (tenant, event_id, event_time, published) "
                    "SELECT 't0', 'expired-' || n, $1, 1 FROM generate_series($2::int, $3::int) AS n",
                    (moment - timedelta(days=2, seconds=start)).isoformat(), start, start + count - 1)
    finally:
        await db.close()


async def dedup_table(settings: Settings) -> dict[str, int]:
    db = await open_database("ingest", settings)
    try:
        cutoff = (datetime.now(UTC) - timedelta(days=settings.dedup_window_days) - dedup.CLEANUP_MARGIN).isoformat()
        return {"dedup_rows_end": await db.fetchval("SELECT count(*) FROM seen_events"),
                "dedup_expired_rows_left": await db.fetchval(
                    "SELECT count(*) FROM seen_events WHERE event_time < $1", cutoff)}
    finally:
        await db.close()


async def cleanup(bootstrap: str, database_url: str, settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([f"{settings.namespace}.{t}" for t in topics.ALL_TOPICS])
    finally:
        await admin.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.schema("ingest")}" CASCADE')
    finally:
        await conn.close()


async def measure(args: argparse.Namespace, settings: Settings, bootstrap: str,
                  counts: dict[str, int]) -> dict[str, object]:
    await learn_catalogue(settings, args.tenants)
    if args.expired_rows:
        await seed_expired_keys(settings, args.expired_rows)
    forgotten_before = DEDUP_FORGOTTEN._value.get()
    watcher = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await watcher.start()
    accepted_topic = f"{settings.namespace}.{topics.USAGE_ACCEPTED}"
    rejected_topic = f"{settings.namespace}.{topics.USAGE_REJECTED}"
    accepted_parts = [TopicPartition(accepted_topic, p) for p in range(settings.topic_partitions)]
    rejected_parts = [TopicPartition(rejected_topic, p) for p in range(settings.topic_partitions)]
    bus = KafkaBus(bootstrap, settings.topic_partitions, settings.batch_records_max, namespace=settings.namespace)
    runner = Runner(settings, bus, [build], "bench-ingest", None)
    samples: list[tuple[float, int, float]] = []  # (seconds, accepted so far, RSS MB)
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await runner.start()
    first_at: tuple[float, int] | None = None
    accepted = rejected = 0
    try:
        while time.perf_counter() - started < TIMEOUT_SECONDS:
            accepted = await end_total(watcher, accepted_parts)
            rejected = await end_total(watcher, rejected_parts)
            now = time.perf_counter() - started
            if accepted and first_at is None:
                first_at = (now, accepted)
            samples.append((now, accepted, rss_mb()))
            if accepted >= counts["good"] and rejected >= counts["bad"]:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        peak_rss = usage.ru_maxrss / 1024
        cpu = usage.ru_utime - cpu_before.ru_utime + usage.ru_stime - cpu_before.ru_stime
    finally:
        await runner.stop()
        await watcher.stop()
    assert first_at is not None, "nothing was accepted"
    steady = (accepted - first_at[1]) / max(elapsed - first_at[0], 1e-9)
    quarter = [samples[min(len(samples) - 1, int(len(samples) * q))] for q in (0.25, 0.5, 0.75)] + [samples[-1]]
    second_half = [s[2] for s in samples[len(samples) // 2:]]
    return {"seconds": round(elapsed, 2), "accepted": accepted, "rejected": rejected,
            "events_per_second": round(args.events / elapsed),
            "steady_events_per_second": round(steady),
            "group_join_seconds": round(first_at[0], 2),
            "ingest_cpu_seconds": round(cpu, 2), "cpu_us_per_event": round(cpu / args.events * 1e6, 1),
            "peak_rss_mb": round(peak_rss), "rss_mb_at_25_50_75_100pct": [round(s[2]) for s in quarter],
            "rss_growth_mb_second_half": round(second_half[-1] - second_half[0], 1),
            "rss_range_mb_second_half": [round(min(second_half)), round(max(second_half))],
            "dedup_keys_forgotten": round(DEDUP_FORGOTTEN._value.get() - forgotten_before),
            **await dedup_table(settings)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--batch", type=int, default=Settings().batch_records_max,
                        help="records per consumer batch (BILLING_BATCH_RECORDS_MAX)")
    parser.add_argument("--duplicates", type=float, default=0.01, help="share of exact duplicates")
    parser.add_argument("--bad", type=float, default=0.002, help="share of invalid events")
    parser.add_argument("--expired-rows", type=int, default=0,
                        help="dedup keys older than the window put in the table first (the cleanup must forget them)")
    parser.add_argument("--keep", action="store_true", help="keep the namespace's topics and schema")
    args = parser.parse_args()
    configure_logging(json_output=True, level=40)
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    database_url = os.environ["DATABASE_URL"]
    namespace = "bench" + uuid.uuid4().hex[:8]
    settings = dataclasses.replace(Settings.from_env(), kafka_bootstrap_servers=bootstrap,
                                   database_url=database_url, namespace=namespace, batch_records_max=args.batch)
    asyncio.run(ensure_topics(bootstrap, settings.topic_partitions,
                              [f"{namespace}.{t}" for t in topics.ALL_TOPICS]))
    results: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
    producer = multiprocessing.get_context("spawn").Process(target=produce, args=(
        bootstrap, f"{namespace}.{topics.USAGE_RAW}", namespace, args.events, args.tenants, args.duplicates,
        args.bad, results))
    producer.start()
    counts = results.get()
    producer.join()
    try:
        figures = asyncio.run(measure(args, settings, bootstrap, counts))
        ids, total = asyncio.run(read_accepted(bootstrap, f"{namespace}.{topics.USAGE_ACCEPTED}"))
        figures["accepted_ids_distinct"] = len(ids)
        figures["accepted_records"] = total
        figures["exactly_once"] = len(ids) == total == counts["good"]
        print(json.dumps({"bench": "ingest", "namespace": namespace, "events": args.events, "batch": args.batch,
                          "sent": counts, **figures}))
        assert figures["exactly_once"], "every good event accepted exactly once"
    finally:
        if not args.keep:
            asyncio.run(cleanup(bootstrap, database_url, settings))


if __name__ == "__main__":
    main()
