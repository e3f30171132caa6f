"""Dropping a namespace on the real broker and database removes its topics and schemas and nothing else."""

from __future__ import annotations

import asyncio

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.namespaces import drop_namespaces, namespace_of, scratch_namespace
from tests.support import wait_until


async def _topics(kafka: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def _schemas(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {r["nspname"] for r in await conn.fetch("SELECT nspname FROM pg_namespace")}
    finally:
        await conn.close()


def test_a_dropped_namespace_leaves_no_topic_or_schema_and_spares_the_others(infra: dict[str, str]) -> None:
    kafka, database = infra["KAFKA_BOOTSTRAP_SERVERS"], infra["DATABASE_URL"]
    doomed, kept = scratch_namespace("t"), scratch_namespace("t")

    async def make() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(f"{ns}.billing.usage.raw", 2, 1) for ns in (doomed, kept)])
        finally:
            await admin.close()
        conn = await asyncpg.connect(database)
        try:
            for ns in (doomed, kept):
                await conn.execute(f'CREATE SCHEMA "{ns}_billing_ingest"')
        finally:
            await conn.close()

    asyncio.run(make())
    assert asyncio.run(drop_namespaces(kafka, database, lambda name: namespace_of(name) == doomed)) == (1, 1)

    wait_until(lambda: f"{doomed}.billing.usage.raw" not in asyncio.run(_topics(kafka)), what="topic deleted")
    assert f"{kept}.billing.usage.raw" in asyncio.run(_topics(kafka))
    schemas = asyncio.run(_schemas(database))
    assert f"{doomed}_billing_ingest" not in schemas
    assert f"{kept}_billing_ingest" in schemas
