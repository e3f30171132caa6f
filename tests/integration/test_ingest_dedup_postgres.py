"""Ingest's batched dedup on real PostgreSQL: one statement per batch, the same answers as SQLite, concurrent
batches with overlapping keys claim each key once (and never deadlock), cleanup bounded per run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from billing_ingest import dedup
from billing_runtime.db import PostgresDatabase

from tests.namespaces import scratch_namespace
from tests.support import drop_schema

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(infra: dict[str, str]) -> AsyncIterator[PostgresDatabase]:
    schema = f"{scratch_namespace()}_billing_ingest"
    database = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    await database.executescript(dedup.SCHEMA)
    yield database
    await database.close()
    await drop_schema(infra["DATABASE_URL"], schema)  # created by this test


def rows(prefix: str, count: int, at: datetime | None = None) -> list[tuple[str, str, str]]:
    moment = (at or datetime.now(UTC)).isoformat()
    return [("acme", f"{prefix}-{i}", moment) for i in range(count)]


async def test_a_batch_claims_new_keys_and_unpublished_ones_but_not_published_ones(db: PostgresDatabase) -> None:
    async with db.transaction() as conn:
        assert await dedup.claim(conn, "postgres", rows("a", 3)) == {("acme", "a-0"), ("acme", "a-1"),
                                                                     ("acme", "a-2")}
    await db.execute("INSERT INTO seen_events (tenant, event_id, event_time, published) "
                     "VALUES ('acme', 'legacy', '2026-11-21T00:00:00+00:00', 0)")
    async with db.transaction() as conn:
        claimed = await dedup.claim(conn, "postgres", rows("a", 5) + [("acme", "legacy", "x")])
    assert claimed == {("acme", "a-3"), ("acme", "a-4"), ("acme", "legacy")}
    assert await db.fetchval("SELECT count(*) FROM seen_events WHERE published = 0") == 0


async def test_a_rolled_back_batch_leaves_no_keys(db: PostgresDatabase) -> None:
    with pytest.raises(RuntimeError):
        async with db.transaction() as conn:
            await dedup.claim(conn, "postgres", rows("r", 10))
            raise RuntimeError("publish failed")
    assert await db.fetchval("SELECT count(*) FROM seen_events") == 0


async def test_concurrent_overlapping_batches_claim_each_key_exactly_once(db: PostgresDatabase) -> None:
    keys = rows("c", 2000)

    async def batch(selection: list[tuple[str, str, str]]) -> set[tuple[str, str]]:
        async with db.transaction() as conn:
            claimed = await dedup.claim(conn, "postgres", selection)
            await asyncio.sleep(0.05)  # hold the transaction open, like a publish in flight
            return claimed

    results = await asyncio.gather(*(batch(keys[start::3] + keys[::7]) for start in range(3)))
    claimed = [key for result in results for key in result]
    assert len(claimed) == len(set(claimed)) == len(keys)


async def test_cleanup_deletes_only_expired_keys_in_bounded_runs(db: PostgresDatabase) -> None:
    now = datetime.now(UTC)
    window = timedelta(days=35)
    async with db.transaction() as conn:
        await dedup.claim(conn, "postgres", rows("old", 250, now - window - timedelta(days=2)) + rows("new", 40))
    assert await dedup.cleanup(db, now, window, rows_max=100, rows_per_run_max=200) == 200
    assert await dedup.cleanup(db, now, window, rows_max=100, rows_per_run_max=200) == 50
    assert await dedup.cleanup(db, now, window, rows_max=100, rows_per_run_max=200) == 0
    assert await db.fetchval("SELECT count(*) FROM seen_events") == 40
