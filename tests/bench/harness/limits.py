"""The raw limits of this machine, measured in the same run with the same messages:

* **Kafka**: the stream's records produced (aiokafka, ``acks=all``, idempotent, the services' producer
  settings) to a fresh topic with the same partition count, and consumed back by one consumer, no
  processing: events/s from the first send to the last record received;
* **PostgreSQL**: the same events as rows inserted with asyncpg ``COPY`` (``copy_records_to_table``), one
  transaction per batch of ``batch`` rows like a consumer batch, and once as a single ``COPY``.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic


async def kafka_limit(bootstrap: str, topic: str, partitions: int, records: list[tuple[bytes, bytes]],
                      timeout: float = 600) -> dict[str, Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                                max_batch_size=1024 * 1024)
    await producer.start()
    # A new topic's partitions need a leader before the first fetch (else the broker answers
    # NotLeaderForPartition and aiokafka logs errors while it retries).
    for _ in range(50):
        await producer.client.force_metadata_update()
        leaders = [producer.client.cluster.leader_for_partition(TopicPartition(topic, p)) for p in range(partitions)]
        if all(leader is not None and leader >= 0 for leader in leaders):
            break
        await asyncio.sleep(0.1)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, max_poll_records=5000)
    await consumer.start()
    received = 0
    done = asyncio.Event()

    async def consume() -> None:
        nonlocal received
        while received < len(records):
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            received += sum(len(b) for b in batches.values())
        done.set()

    try:
        reader = asyncio.create_task(consume())
        await asyncio.sleep(0.5)  # the consumer has its partitions before the first send
        started = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
        produced = time.perf_counter() - started
        await asyncio.wait_for(done.wait(), timeout=timeout)
        total = time.perf_counter() - started
        await reader
    finally:
        await producer.stop()
        await consumer.stop()
    return {"events": len(records), "produce_seconds": round(produced, 3), "seconds": round(total, 3),
            "produce_events_per_second": round(len(records) / produced),
            "events_per_second": round(len(records) / total)}


def _row(value: bytes) -> tuple[Any, ...] | None:
    try:
        event = json.loads(value)
        return (event["tenant"], event["id"], event["meter"], Decimal(event["quantity"]),
                datetime.fromisoformat(event["timestamp"]), value.decode())
    except (ValueError, KeyError, TypeError):
        return None


async def postgres_limit(database_url: str, schema: str, records: list[tuple[bytes, bytes]],
                         batch: int) -> dict[str, Any]:
    unique: dict[tuple[str, str], tuple[Any, ...]] = {}
    for _, value in records:
        row = _row(value)
        if row is not None:
            unique.setdefault((row[0], row[1]), row)  # a duplicate is one row, as in the service
    rows = list(unique.values())
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        result: dict[str, Any] = {"rows": len(rows), "batch_rows": batch}
        for name, size in (("batched", batch), ("single", len(rows))):
            table = f"raw_usage_{name}"
            await conn.execute(
                f'CREATE TABLE "{schema}".{table} (tenant TEXT NOT NULL, event_id TEXT NOT NULL, '
                "meter TEXT NOT NULL, quantity NUMERIC NOT NULL, event_time TIMESTAMPTZ NOT NULL, "
                "payload TEXT NOT NULL, PRIMARY KEY (tenant, event_id))")
            started = time.perf_counter()
            for start in range(0, len(rows), size):
                async with conn.transaction():
                    await conn.copy_records_to_table(table, records=rows[start:start + size], schema_name=schema)
            seconds = time.perf_counter() - started
            result[f"{name}_seconds"] = round(seconds, 3)
            result[f"{name}_rows_per_second"] = round(len(rows) / seconds)
        return result
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
