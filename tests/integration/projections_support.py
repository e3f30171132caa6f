"""Helpers for projection tests on the real stack: a projections process in its own namespace, fed real
ledger events through Kafka, and row-for-row dumps of its PostgreSQL schema."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from billing_events import topics
from billing_projections.rebuild import kafka_partitions
from billing_projections.store import ALL_TABLES
from billing_runtime.bus import KafkaBus, OutMessage

from tests.namespaces import scratch_namespace
from tests.support import ServiceProcess, free_port, wait_until


@dataclass
class ProjectionsStack:
    env: dict[str, str]
    namespace: str
    url: str
    process: ServiceProcess
    log_dir: Path

    @property
    def schema(self) -> str:
        return f"{self.namespace}_billing_projections"

    @property
    def database_url(self) -> str:
        return self.env["DATABASE_URL"]

    @property
    def kafka(self) -> str:
        return self.env["KAFKA_BOOTSTRAP_SERVERS"]

    def restart(self) -> None:
        self.process = ServiceProcess(self.process.args, self.process.env, self.process.log_path,
                                      self.process.port).start()


def start_projections(infra: dict[str, str], log_dir: Path) -> ProjectionsStack:
    namespace = scratch_namespace("p")
    port = free_port()
    env = {**infra, "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(log_dir / "var")}
    process = ServiceProcess(["serve", "projections", "--port", str(port)], env, log_dir / "projections.log",
                             port).start()
    return ProjectionsStack(env, namespace, f"http://127.0.0.1:{port}", process, log_dir)


async def publish(stack: ProjectionsStack, messages: Sequence[OutMessage]) -> None:
    bus = KafkaBus(stack.kafka, namespace=stack.namespace)
    await bus.start()
    try:
        for start in range(0, len(messages), 5000):
            await bus.publish(messages[start:start + 5000])
    finally:
        await bus.stop()


async def end_offsets(stack: ProjectionsStack) -> dict[int, int]:
    topic = f"{stack.namespace}.{topics.LEDGER_EVENTS}"
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.kafka, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in await kafka_partitions(stack.kafka, topic)]
        return {tp.partition: off for tp, off in (await consumer.end_offsets(parts)).items()}
    finally:
        await consumer.stop()


async def applied_offsets(database_url: str, schema: str) -> dict[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(f'SELECT partition, next_offset FROM "{schema}".positions')
    except asyncpg.UndefinedTableError:
        return {}
    finally:
        await conn.close()
    return {int(r["partition"]): int(r["next_offset"]) for r in rows}


def wait_caught_up(stack: ProjectionsStack, timeout: float = 120) -> dict[int, int]:
    ends = asyncio.run(end_offsets(stack))
    wanted = {p: o for p, o in ends.items() if o > 0}

    def caught_up() -> bool:
        applied = asyncio.run(applied_offsets(stack.database_url, stack.schema))
        return all(applied.get(p, 0) >= o for p, o in wanted.items())

    wait_until(caught_up, timeout=timeout, interval=0.3, what=f"projections to reach {wanted}")
    return wanted


async def dump_schema(database_url: str, schema: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(database_url)
    try:
        tables: dict[str, list[tuple[object, ...]]] = {}
        for table in ALL_TABLES:
            columns = list(table.key) + list(table.columns)
            rows = await conn.fetch(f'SELECT {", ".join(columns)} FROM "{schema}".{table.name} '
                                    f'ORDER BY {", ".join(table.key)}')
            tables[table.name] = [tuple(r) for r in rows]
        return tables
    finally:
        await conn.close()


