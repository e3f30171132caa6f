"""Rating throughput through real Kafka + PostgreSQL: accepted usage in, ledger commands out.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \
        .venv/bin/python tests/bench/bench_rating.py --events 100000

Produces N accepted usage events (many tenants, a graduated meter and a per-unit meter) into a fresh
namespace, then runs the rating consumer in this process and measures until every ledger command is out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import time
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.app import build
from billing_runtime.bus import KafkaBus, ensure_topics
from billing_runtime.logging import configure_logging
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings

CATALOG = {"meters": [
    {"code": "api_calls", "aggregation": "sum", "price": {"model": "graduated", "unit": "USD", "tiers": [
        {"up_to": "1000", "unit_amount": "0.01"}, {"up_to": "100000", "unit_amount": "0.008"},
        {"up_to": None, "unit_amount": "0.005"}]}},
    {"code": "compute_seconds", "aggregation": "sum", "price": {"model": "per_unit", "unit": "USD",
                                                                "unit_amount": "0.000012"}},
]}


async def produce(bootstrap: str, namespace: str, events: int, tenants: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2,
                              type="Catalog.Published", recorded_at=datetime.now(UTC),
                              data={"version": 1, "document": CATALOG})
        await producer.send_and_wait(f"{namespace}.{topics.LEDGER_EVENTS}", catalog.to_json(), key=b"catalog")
        now = datetime.now(UTC)
        futures = []
        for i in range(events):
            tenant = f"t{i % tenants}"
            meter = "api_calls" if i % 3 else "compute_seconds"
            event = UsageEvent(id=f"e{i}", tenant=tenant, meter=meter, quantity=str(1 + i % 7), timestamp=now)
            message = AcceptedUsage(account_id=ids.account_id(tenant), event=event, accepted_at=now,
                                    source="bench", catalog_version=1)
            futures.append(await producer.send(f"{namespace}.{topics.USAGE_ACCEPTED}", message.to_json(),
                                               key=str(ids.account_id(tenant)).encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def count_until(bootstrap: str, topic: str, expected: int, timeout_s: float) -> int:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10000)
            for records in batches.values():
                for record in records:
                    seen.add(json.loads(record.value)["command_id"])
    finally:
        await consumer.stop()
    return len(seen)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--tenants", type=int, default=200)
    args = parser.parse_args()
    configure_logging(json_output=True, level=40)
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    namespace = "bench" + uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=os.environ["DATABASE_URL"],
                        namespace=namespace, batch_records_max=1000)
    await ensure_topics(bootstrap, settings.topic_partitions, [f"{namespace}.{t}" for t in topics.ALL_TOPICS])
    await produce(bootstrap, namespace, args.events, args.tenants)
    runner = Runner(settings, KafkaBus(bootstrap, settings.topic_partitions, settings.batch_records_max,
                                       namespace=namespace), [build], "bench", None)
    started = time.perf_counter()
    await runner.start()
    # Commands: one per priced event (zero-amount increments post nothing).
    done = await count_until(bootstrap, f"{namespace}.{topics.LEDGER_COMMANDS}", args.events, 600)
    elapsed = time.perf_counter() - started
    await runner.stop()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"bench": "rating", "events": args.events, "commands": done, "seconds": round(elapsed, 2),
                      "events_per_second": round(args.events / elapsed), "peak_rss_mb": round(rss_mb)}))


if __name__ == "__main__":
    asyncio.run(main())
