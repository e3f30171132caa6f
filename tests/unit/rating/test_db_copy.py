"""``copy_records`` and ``is_unique_violation`` on SQLite (PostgreSQL: tests/integration/test_rating.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from billing_runtime.db import SqliteDatabase, is_unique_violation


async def test_sqlite_copy_records_appends_lists_and_async_iterables(tmp_path: Path) -> None:
    db = await SqliteDatabase(tmp_path / "copy.sqlite").connect()
    try:
        await db.executescript("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT, note TEXT)")

        async def rows() -> AsyncIterator[tuple[Any, ...]]:
            for i in range(3):
                yield (f"a{i}", i, None)

        async with db.transaction() as conn:
            await conn.copy_records("t", ("k", "n", "note"), [("x", 2**40, "é")])
            await conn.copy_records("t", ("k", "n", "note"), rows())
            await conn.copy_records("t", ("k", "n", "note"), [])
        assert [tuple(r.values()) for r in await db.fetch("SELECT k, n, note FROM t ORDER BY k")] == [
            ("a0", 0, None), ("a1", 1, None), ("a2", 2, None), ("x", 2**40, "é")]
        with pytest.raises(sqlite3.IntegrityError) as caught:
            async with db.transaction() as conn:
                await conn.copy_records("t", ("k", "n", "note"), [("new", 1, None), ("x", 1, None)])
        assert is_unique_violation(caught.value, "t_pkey")
        assert not is_unique_violation(ValueError("UNIQUE constraint failed"), "t_pkey")
        assert await db.fetchval("SELECT count(*) FROM t") == 4  # the failed copy left nothing
    finally:
        await db.close()
