"""Projection tests run the real service on SQLite (the embedded backend: same SQL, same code)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from billing_projections.service import ProjectionService
from billing_projections.store import ALL_TABLES
from billing_runtime.bus import Record
from billing_runtime.db import Database, SqliteDatabase

from tests.unit.projections.ledger_events import by_partition


@asynccontextmanager
async def sqlite_service(path: Path) -> AsyncIterator[ProjectionService]:
    """A projection service on a fresh SQLite file, its tables created; the file is closed on the way out."""
    db = await SqliteDatabase(path).connect()
    try:
        service = ProjectionService(db)
        await service.setup()
        yield service
    finally:
        await db.close()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[ProjectionService]:
    async with sqlite_service(tmp_path / "projections.sqlite") as svc:
        yield svc


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


async def dumps_by_batching(records: list[Record], directory: Path, *, seed: int, size_max: int,
                            replay_all: bool = False) -> list[dict[str, list[tuple[object, ...]]]]:
    """The read models after applying ``records`` one at a time, all at once, and in random slices of
    1..``size_max`` per partition (then, with ``replay_all``, everything once more): equal dumps mean batch
    boundaries and replays change no row."""
    rng = random.Random(seed)
    dumps = []
    for name, batch in (("one", 1), ("all", 10_000), ("random", 0)):
        async with sqlite_service(directory / f"{name}.sqlite") as service:
            if batch:
                await apply(service, records, batch=batch)
            else:
                for part in by_partition(records).values():
                    start = 0
                    while start < len(part):
                        size = rng.randint(1, size_max)
                        await service.handle_ledger_events(part[start:start + size])
                        start += size
                if replay_all:
                    await apply(service, records)
            dumps.append(await dump(service.db))
    return dumps
