"""A record larger than Kafka takes, on the real broker: ``KafkaBus.publish`` refuses the call before sending anything
(``RecordTooLarge``), and the bus goes on publishing to that partition. Before, the broker refused the record and the
idempotent producer's sequence of the partition was broken: every later record to it failed
(``OutOfOrderSequenceNumber``), whatever its size (rating's catalogue route then failed every publish after one
oversized catalogue)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics
from billing_runtime.bus import KafkaBus, OutMessage, RecordTooLarge

from tests.namespaces import scratch_namespace

pytestmark = pytest.mark.integration


@pytest.fixture
def namespace(infra: dict[str, str]) -> Iterator[str]:
    name = scratch_namespace("tl")
    yield name

    async def drop() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=infra["KAFKA_BOOTSTRAP_SERVERS"])
        await admin.start()
        try:
            await admin.delete_topics([f"{name}.{t}" for t in topics.ALL_TOPICS])
        finally:
            await admin.close()

    asyncio.run(drop())


def test_a_record_too_large_is_refused_before_sending_and_the_partition_goes_on(
        infra: dict[str, str], namespace: str) -> None:
    bootstrap = infra["KAFKA_BOOTSTRAP_SERVERS"]
    topic = topics.LEDGER_COMMANDS

    async def run() -> list[bytes]:
        bus = KafkaBus(bootstrap, partitions=1, namespace=namespace)
        await bus.start()
        try:
            await bus.publish([OutMessage(topic, "k", b"before")])
            with pytest.raises(RecordTooLarge, match=f"more than the {topics.RECORD_BYTES_MAX:,} bytes"):
                await bus.publish([OutMessage(topic, "k", b"small, with it"),
                                   OutMessage(topic, "k", b"x" * topics.RECORD_BYTES_MAX)])
            await asyncio.wait_for(bus.publish([OutMessage(topic, "k", b"after")]), 30)
        finally:
            await bus.stop()
        consumer = AIOKafkaConsumer(f"{namespace}.{topic}", bootstrap_servers=bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        values: list[bytes] = []
        try:
            for _ in range(20):  # until both are read (and a short poll after, for anything else)
                got = await consumer.getmany(timeout_ms=500 if len(values) >= 2 else 5_000)
                if not got and len(values) >= 2:
                    return values
                values += [r.value for records in got.values() for r in records]
            return values
        finally:
            await consumer.stop()

    # Nothing of the refused call was sent, the small record with it neither; the next publish went through.
    assert asyncio.run(run()) == [b"before", b"after"]
