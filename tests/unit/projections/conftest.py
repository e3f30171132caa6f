"""Projection tests run the real service on SQLite (the embedded backend: same SQL, same code)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from billing_projections.service import ProjectionService
from billing_projections.store import ALL_TABLES
from billing_runtime.bus import Record
from billing_runtime.db import Database, SqliteDatabase

from tests.unit.projections.ledger_events import by_partition


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ProjectionService]:
    db = await SqliteDatabase(tmp_path / "projections.sqlite").connect()
    svc = ProjectionService(db)
    await svc.setup()
    yield svc
    await db.close()


async def apply(service: ProjectionService, records: list[Record], batch: int = 500) -> None:
    for part_records in by_partition(records).values():
        for start in range(0, len(part_records), batch):
            await service.handle_ledger_events(part_records[start:start + batch])


async def dump(db: Database) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every projection table, sorted: two read models are equal iff their dumps are."""
    tables: dict[str, list[tuple[object, ...]]] = {}
    for table in ALL_TABLES:
        columns = list(table.key) + list(table.columns)
        rows = await db.fetch(f"SELECT {', '.join(columns)} FROM {table.name}")
        tables[table.name] = sorted((tuple(r[c] for c in columns) for r in rows), key=repr)
    return tables
