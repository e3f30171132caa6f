"""The batch writer on real PostgreSQL writes exactly the rows it writes on SQLite (the tested reference):
upserts and updates of every column kind, sent as one JSON array per statement (``writer._write_unnested``). On
PostgreSQL a new row is given only the columns its changes name (``writer._Shape``), the table's defaults the rest;
SQLite is given every column: the rows must be the same."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_projections.writer import DEC_SUM, INT_SUM, BatchWriter, Table, value
from billing_runtime.db import Database, PostgresDatabase, SqliteDatabase

from tests.namespaces import scratch_namespace
from tests.support import drop_schema

pytestmark = pytest.mark.integration

# ``unit`` is required (NOT NULL, no default): a change without it can only update an existing row.
T = Table("t", {"k": "TEXT", "p": "INTEGER"}, {
    "unit": value("TEXT NOT NULL"), "n": INT_SUM, "q": DEC_SUM, "note": value("TEXT"), "at": value("BIGINT"),
    # A default of its own in the DDL: the writer's is NULL, so PostgreSQL must be given the column too.
    "tag": value("TEXT DEFAULT 'untagged'"),
})
ODD_TEXTS = ["plain", "quote ' and \" both", "back\\slash", "ünïcödé ✓ 日本", '{"looks": ["like", "json"]}', "",
             "null", "tab\tnew\nline"]

Op = tuple[tuple[str, int], dict[str, Any] | None, dict[str, Any] | None, dict[str, Any] | None]


def _batches() -> list[list[Op]]:
    first: list[Op] = []
    for i, text in enumerate(ODD_TEXTS):
        first.append(((text, i), {"unit": "USD"}, {"note": text, "at": 2**62 + i}, {"n": -(2**40) - i,
                                                                                       "q": Decimal("0.1")}))
        first.append(((text, i), None, {"note": None}, {"n": 3, "q": Decimal("-1.25")}))
    later: list[Op] = []
    for i, text in enumerate(ODD_TEXTS):
        # Existing rows: updates, the same columns named in either order (one statement, values in its order).
        add = {"n": 7, "q": Decimal("1E+3")}
        set_ = {"note": text[::-1], "at": -5}
        later.append(((text, i), None, None, add if i % 2 else dict(reversed(add.items()))))
        later.append(((text, i), None, set_ if i % 2 else dict(reversed(set_.items())), None))
    later.append((("missing", 0), None, None, {"n": 1}))  # no row and no unit: nothing to update
    later.append((("new", 0), {"unit": "EUR"}, None, {"q": Decimal("2.50")}))
    later.append((("init and add", 0), {"unit": "USD", "n": 5, "note": "init"}, None, {"n": 3}))
    return [first, later]


# No required column: every change can create its row (PostgreSQL sends such rows as their dicts' values).
U = Table("u", {"k": "TEXT"}, {"n": INT_SUM, "q": DEC_SUM, "note": value("TEXT"), "at": value("BIGINT")})


def _u_batches() -> list[list[Op]]:
    first: list[Op] = []
    for i, text in enumerate(ODD_TEXTS):
        set_, add = {"note": text, "at": i}, {"q": Decimal("0.10"), "n": i}
        if i % 2:  # the same columns in the other order
            set_, add = dict(reversed(set_.items())), dict(reversed(add.items()))
        first.append(((text, 0), None, set_, add))
    first.append((("only added", 0), None, None, {"n": 0}))  # a falsy value: the row is written all the same
    later: list[Op] = [((text, 0), None, None, {"q": "2.5", "n": 1}) for text in ODD_TEXTS[:3]]
    later.append((("with init", 0), {"note": "init", "q": "1.50"}, None, {"n": 2}))
    return [first, later]


async def test_rows_any_change_creates_are_the_same(postgres: PostgresDatabase, tmp_path: Path) -> None:
    async def apply(db: Database, dialect: str) -> list[tuple[Any, ...]]:
        async with db.transaction() as conn:
            for statement in U.ddl(dialect):
                await conn.execute(statement)
        for batch in _u_batches():
            writer = BatchWriter()
            for (key, _), init, set_, add in batch:
                writer.upsert(U, (key,), init=init, set=set_, add=add)
            async with db.transaction() as conn:
                await writer.flush(conn, dialect)
        rows = await db.fetch("SELECT k, n, q, note, at FROM u")
        return sorted((tuple(r[c] for c in ("k", "n", "q", "note", "at")) for r in rows), key=repr)

    sqlite = await SqliteDatabase(tmp_path / "u.sqlite").connect()
    try:
        expected = await apply(sqlite, "sqlite")
    finally:
        await sqlite.close()
    found = await apply(postgres, "postgres")
    assert found == expected
    by_key = {row[0]: row for row in found}
    assert by_key["plain"] == ("plain", 1, "2.6", "plain", 0)
    assert by_key["only added"] == ("only added", 0, "0", None, None)
    assert by_key["with init"] == ("with init", 2, "1.5", "init", None)


async def _apply(db: Database, dialect: str) -> list[tuple[Any, ...]]:
    async with db.transaction() as conn:
        for statement in T.ddl(dialect):
            await conn.execute(statement)
    for batch in _batches():
        writer = BatchWriter()
        for key, init, set_, add in batch:
            writer.upsert(T, key, init=init, set=set_, add=add)
        async with db.transaction() as conn:
            await writer.flush(conn, dialect)
    rows = await db.fetch("SELECT k, p, unit, n, q, note, at, tag FROM t")
    return sorted((tuple(r[c] for c in ("k", "p", "unit", "n", "q", "note", "at", "tag")) for r in rows), key=repr)


@pytest.fixture
async def postgres(infra: dict[str, str]) -> AsyncIterator[PostgresDatabase]:
    schema = f"{scratch_namespace()}_writer"
    db = await PostgresDatabase(infra["DATABASE_URL"], schema).connect()
    try:
        yield db
    finally:
        await db.close()
        await drop_schema(infra["DATABASE_URL"], schema)


async def test_postgres_writes_the_rows_sqlite_writes(postgres: PostgresDatabase, tmp_path: Path) -> None:
    sqlite = await SqliteDatabase(tmp_path / "w.sqlite").connect()
    try:
        expected = await _apply(sqlite, "sqlite")
    finally:
        await sqlite.close()
    found = await _apply(postgres, "postgres")
    assert found == expected
    by_key = {(row[0], row[1]): row for row in found}
    assert ("missing", 0) not in by_key
    assert by_key[("new", 0)][2:] == ("EUR", 0, "2.5", None, None, None)
    assert by_key[("init and add", 0)][2:] == ("USD", 3, "0", "init", None, None)
    assert by_key[("ünïcödé ✓ 日本", 3)][3:7] == (-(2**40) - 3 + 10, "998.85", "本日 ✓ édöcïnü", -5)
