"""The batch writer merges upserts per row in event order and equals applying them one by one."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from billing_projections.writer import DEC_SUM, INT_SUM, BatchWriter, Table, value
from billing_runtime.db import SqliteDatabase

T = Table("t", {"k": "TEXT"}, {"n": INT_SUM, "q": DEC_SUM, "s": value("TEXT"), "i": value("TEXT")})


async def _rows(db: SqliteDatabase) -> list[dict[str, object]]:
    return await db.fetch("SELECT k, n, q, s, i FROM t ORDER BY k")


async def test_merged_batch_equals_one_by_one(tmp_path: Path) -> None:
    ops = [
        ("a", {"i": "first"}, {"s": "x"}, {"n": 2, "q": Decimal("0.5")}),
        ("a", {"i": "second"}, None, {"n": 3, "q": Decimal("1.25")}),
        ("b", None, {"s": "y"}, None),
        ("a", None, {"s": "z", "n": 10}, {"n": 1}),
        ("b", None, None, {"q": Decimal(-2)}),
    ]
    results = []
    for split in (1, len(ops)):
        db = await SqliteDatabase(tmp_path / f"w{split}.sqlite").connect()
        await db.executescript(";".join(T.ddl()))
        for start in range(0, len(ops), split):
            writer = BatchWriter()
            for key, init, set_, add in ops[start:start + split]:
                writer.upsert(T, (key,), init=init, set=set_, add=add)
            async with db.transaction() as conn:
                await writer.flush(conn)
        results.append(await _rows(db))
        await db.close()
    assert results[0] == results[1]
    assert results[0] == [
        {"k": "a", "n": 11, "q": "1.75", "s": "z", "i": "first"},
        {"k": "b", "n": 0, "q": "-2", "s": "y", "i": None},
    ]


async def test_decimal_sums_stay_exact(tmp_path: Path) -> None:
    db = await SqliteDatabase(tmp_path / "d.sqlite").connect()
    await db.executescript(";".join(T.ddl()))
    for _ in range(10):
        writer = BatchWriter()
        writer.upsert(T, ("k",), add={"q": Decimal("0.1")})
        async with db.transaction() as conn:
            await writer.flush(conn)
    assert (await _rows(db))[0]["q"] == "1"  # ten binary-float 0.1s would not be exactly 1
    await db.close()
