"""``copy_records`` and ``is_unique_violation`` on SQLite (PostgreSQL: tests/integration/test_db_postgres.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from billing_runtime.db import SqliteDatabase, is_unique_violation

from tests.support import exercise_copy_records


async def test_sqlite_copy_records_appends_lists_and_async_iterables(tmp_path: Path) -> None:
    db = await SqliteDatabase(tmp_path / "copy.sqlite").connect()
    try:
        caught = await exercise_copy_records(db, sqlite3.IntegrityError)
        assert is_unique_violation(caught, "t_pkey")
        assert not is_unique_violation(ValueError("UNIQUE constraint failed"), "t_pkey")
    finally:
        await db.close()
