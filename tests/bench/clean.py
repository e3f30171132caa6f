"""Drops what interrupted benches left behind: Kafka topics and PostgreSQL schemas of ``bench*`` namespaces.

Every bench works in a fresh namespace ``bench<random>`` (its topics ``bench<random>.<topic>``, its schemas
``bench<random>_billing_<service>``) and drops it at the end; a bench that was killed leaves it, and hundreds
of leftover topics cost the broker (and every later bench) CPU. ``make bench-clean`` runs this; nothing but
``bench`` namespaces is touched. Do not run it while a bench is running.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

PREFIX = "bench"


async def main() -> None:
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    try:
        schemas = [r["nspname"] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", PREFIX)]
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        await conn.close()
    admin = AIOKafkaAdminClient(bootstrap_servers=os.environ["KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(PREFIX)]
        for start in range(0, len(topics), 100):
            await admin.delete_topics(topics[start:start + 100])
    finally:
        await admin.close()
    print(f"dropped {len(schemas)} schemas and {len(topics)} topics of {PREFIX}* namespaces")


if __name__ == "__main__":
    asyncio.run(main())
