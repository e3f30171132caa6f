"""The PostgreSQL adapter (``billing_runtime.db``) on the real server: COPY, and pools without session reset."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from billing_runtime.db import PostgresDatabase, is_unique_violation

from tests.namespaces import scratch_namespace
from tests.support import drop_schema, exercise_copy_records

pytestmark = pytest.mark.integration


@pytest.fixture
async def schema(infra: dict[str, str]) -> AsyncIterator[str]:
    name = f"{scratch_namespace()}_db"
    yield name
    await drop_schema(infra["DATABASE_URL"], name)


async def test_copy_records_and_unique_violations(infra: dict[str, str], schema: str) -> None:
    db = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    try:
        caught = await exercise_copy_records(db, asyncpg.UniqueViolationError)
        assert is_unique_violation(caught, "t_pkey") and not is_unique_violation(caught, "other")
    finally:
        await db.close()


async def test_a_pool_without_session_reset_reads_committed_rows_and_rolls_back_open_transactions(
        infra: dict[str, str], schema: str) -> None:
    writer = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    reader = await PostgresDatabase(infra["DATABASE_URL"], schema, 1, reset_sessions=False).connect()
    try:
        await writer.executescript("CREATE TABLE b (k TEXT PRIMARY KEY, n BIGINT)")
        await writer.execute("INSERT INTO b VALUES ('acme', 1)")
        assert await reader.fetchval("SELECT n FROM b WHERE k = 'acme'") == 1
        async with writer.transaction() as conn:  # not committed yet: the reader must not see it
            await conn.execute("UPDATE b SET n = 2 WHERE k = 'acme'")
            assert await reader.fetchval("SELECT n FROM b WHERE k = 'acme'") == 1
        assert await reader.fetchval("SELECT n FROM b WHERE k = 'acme'") == 2
        # A failed transaction on the single pooled connection leaves it usable (rolled back, not reset).
        with pytest.raises(asyncpg.UndefinedTableError):
            async with reader.transaction() as conn:
                await conn.fetch("SELECT * FROM no_such_table")
        assert await reader.fetchval("SELECT count(*) FROM b") == 1
    finally:
        await reader.close()
        await writer.close()


async def test_processes_starting_together_create_their_schema_once(infra: dict[str, str], schema: str) -> None:
    """Several services (or consumer processes) connecting at the same moment to a schema that does not exist
    yet all come up; concurrent ``CREATE SCHEMA IF NOT EXISTS`` failed all but one with a duplicate key."""
    import asyncio

    databases = await asyncio.gather(*[PostgresDatabase(infra["DATABASE_URL"], schema).connect() for _ in range(6)])
    try:
        assert await databases[-1].fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", schema) == 1
    finally:
        for db in databases:
            await db.close()
