"""Batched, order-preserving writes of read-model rows: one statement per table and shape, not per event.

Projections describe what an event does to a row as an *upsert*: ``init`` (values when the row is created),
``set`` (overwrite) and ``add`` (accumulate). The writer merges every upsert of one batch per row, in event
order, and flushes each table with ``executemany``. The result equals applying the events one by one, which
is what keeps a rebuild identical to the live tables, and it turns thousands of events into a handful of
statements (rebuild speed).

Integer accumulators are added by the database (``col = t.col + excluded.col``), so rows shared by several
writers stay exact. Decimal accumulators (quantities, exact decimal text) are read back, added with
``Decimal`` in Python and written as text: SQLite has no exact decimal type and the same SQL runs on both.
A decimal table's key columns must all be TEXT, so the read-back can use ``(k1, k2) IN (VALUES ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from functools import cached_property
from typing import Any

from billing_projections.limits import LOOKUP_KEYS_MAX
from billing_runtime.db import Connection


class Kind(Enum):
    VALUE = "value"  # any value; set or init
    INT_SUM = "int_sum"  # BIGINT accumulator
    DEC_SUM = "dec_sum"  # exact decimal text accumulator


@dataclass(frozen=True)
class Column:
    kind: Kind
    sql: str


def value(sql: str) -> Column:
    return Column(Kind.VALUE, sql)


INT_SUM = Column(Kind.INT_SUM, "BIGINT NOT NULL DEFAULT 0")
DEC_SUM = Column(Kind.DEC_SUM, "TEXT NOT NULL DEFAULT '0'")


@dataclass(frozen=True)
class Table:
    """A read-model table: its key (column -> SQL type), other columns, and secondary indexes."""

    name: str
    key_types: dict[str, str]
    column_specs: dict[str, Column]
    indexes: tuple[str, ...] = ()  # e.g. "tenant, position"

    @cached_property
    def key(self) -> tuple[str, ...]:
        return tuple(self.key_types)

    @cached_property
    def columns(self) -> dict[str, Kind]:
        return {name: spec.kind for name, spec in self.column_specs.items()}

    @cached_property
    def required(self) -> frozenset[str]:
        """Columns a new row must be given (NOT NULL, no default): rows without them can only be updated."""
        return frozenset(name for name, spec in self.column_specs.items()
                         if spec.kind is Kind.VALUE and "NOT NULL" in spec.sql)

    def default(self, column: str) -> Any:
        kind = self.column_specs[column].kind
        return 0 if kind is Kind.INT_SUM else "0" if kind is Kind.DEC_SUM else None

    def ddl(self) -> list[str]:
        lines = [f"{name} {sql} NOT NULL" for name, sql in self.key_types.items()]
        lines += [f"{name} {spec.sql}" for name, spec in self.column_specs.items()]
        lines.append(f"PRIMARY KEY ({', '.join(self.key)})")
        statements = [f"CREATE TABLE IF NOT EXISTS {self.name} ({', '.join(lines)})"]
        for index, columns in enumerate(self.indexes):
            statements.append(f"CREATE INDEX IF NOT EXISTS {self.name}_ix{index} ON {self.name} ({columns})")
        return statements


@dataclass
class _Row:
    init: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    add: dict[str, Any] = field(default_factory=dict)


class BatchWriter:
    def __init__(self) -> None:
        self._rows: dict[str, tuple[Table, dict[tuple[Any, ...], _Row]]] = {}

    def upsert(self, table: Table, key: tuple[Any, ...], *, init: dict[str, Any] | None = None,
               set: dict[str, Any] | None = None, add: dict[str, Any] | None = None) -> None:
        assert len(key) == len(table.key), f"{table.name}: key {key!r}"
        rows = self._rows.setdefault(table.name, (table, {}))[1]
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row()
        for column, value in (init or {}).items():
            row.init.setdefault(column, value)  # the first creation wins, as in the database
        for column, value in (set or {}).items():
            row.set[column] = value
            row.add.pop(column, None)
        for column, value in (add or {}).items():
            if not value:
                row.add.setdefault(column, value)
                continue
            if column in row.set:
                row.set[column] = _plus(table, column, row.set[column], value)
            else:
                row.add[column] = _plus(table, column, row.add.get(column, 0), value)

    def insert(self, table: Table, key: tuple[Any, ...], values: dict[str, Any]) -> None:
        """A row that is written once and never changes (an existing row is kept)."""
        self.upsert(table, key, init=values)

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self._rows.values())

    async def flush(self, conn: Connection) -> None:
        for name in sorted(self._rows):
            table, rows = self._rows[name]
            await _read_back_decimals(conn, table, rows)
            await _write(conn, table, rows)
        self._rows.clear()


def _plus(table: Table, column: str, a: Any, b: Any) -> Any:
    if table.columns[column] is Kind.DEC_SUM:
        return Decimal(a) + Decimal(b)
    return int(a) + int(b)


async def _read_back_decimals(conn: Connection, table: Table, rows: dict[tuple[Any, ...], _Row]) -> None:
    decimal_columns = [c for c, k in table.columns.items() if k is Kind.DEC_SUM]
    keys = [key for key, row in rows.items() if any(c in row.add for c in decimal_columns)]
    if not keys:
        return
    existing: dict[tuple[Any, ...], dict[str, Any]] = {}
    width = len(table.key)
    for start in range(0, len(keys), LOOKUP_KEYS_MAX):
        chunk = keys[start:start + LOOKUP_KEYS_MAX]
        values = ", ".join(
            "(" + ", ".join(f"${i * width + j + 1}" for j in range(width)) + ")" for i in range(len(chunk)))
        sql = (f"SELECT {', '.join(table.key + tuple(decimal_columns))} FROM {table.name} "
               f"WHERE ({', '.join(table.key)}) IN (VALUES {values})")
        for found in await conn.fetch(sql, *[part for key in chunk for part in key]):
            existing[tuple(found[c] for c in table.key)] = found
    for key in keys:
        row = rows[key]
        base = existing.get(key)
        for column in decimal_columns:
            if column not in row.add:
                continue
            start_value = Decimal(base[column]) if base is not None else Decimal(
                row.set.get(column, row.init.get(column, "0")))
            row.set[column] = start_value + Decimal(row.add.pop(column))


def _text(table: Table, column: str, value: Any) -> Any:
    if table.columns.get(column) is Kind.DEC_SUM:
        return _decimal_text(Decimal(value))
    return value


def _decimal_text(value: Decimal) -> str:
    """Plain notation, no exponent, no trailing zeros (``3``, ``0.5``): the same number is the same text."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


async def _write(conn: Connection, table: Table, rows: dict[tuple[Any, ...], _Row]) -> None:
    columns = list(table.key) + list(table.columns)
    upserts: dict[tuple[tuple[str, ...], tuple[str, ...]], list[list[Any]]] = {}
    updates: dict[tuple[tuple[str, ...], tuple[str, ...]], list[list[Any]]] = {}
    for key in sorted(rows, key=_sort_key):
        row = rows[key]
        shape = (tuple(sorted(row.set)), tuple(sorted(row.add)))
        if table.required and not table.required <= set(row.init) | set(row.set):
            # Not enough to create the row (e.g. a grant's balance change): it exists already, update it.
            if row.set or row.add:
                updates.setdefault(shape, []).append(
                    [_text(table, c, row.set[c]) for c in shape[0]] + [row.add[c] for c in shape[1]] + list(key))
            continue
        values = dict(zip(table.key, key, strict=True))
        for column in table.columns:
            if column in row.set:
                values[column] = row.set[column]
            elif column in row.add:
                values[column] = row.add[column]
            elif column in row.init:
                values[column] = row.init[column]
            else:
                values[column] = table.default(column)
        upserts.setdefault(shape, []).append([_text(table, c, values[c]) for c in columns])
    for (set_columns, add_columns), params in upserts.items():
        changes = [f"{c} = excluded.{c}" for c in set_columns]
        changes += [f"{c} = {table.name}.{c} + excluded.{c}" for c in add_columns]
        placeholders = ", ".join(f"${i + 1}" for i in range(len(columns)))
        action = f"DO UPDATE SET {', '.join(changes)}" if changes else "DO NOTHING"
        await conn.executemany(
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({placeholders}) "
            f"ON CONFLICT ({', '.join(table.key)}) {action}", params)
    for (set_columns, add_columns), params in updates.items():
        changes = [f"{c} = ${i + 1}" for i, c in enumerate(set_columns)]
        changes += [f"{c} = {c} + ${len(set_columns) + i + 1}" for i, c in enumerate(add_columns)]
        first_key = len(set_columns) + len(add_columns) + 1
        where = " AND ".join(f"{c} = ${first_key + i}" for i, c in enumerate(table.key))
        await conn.executemany(f"UPDATE {table.name} SET {', '.join(changes)} WHERE {where}", params)


def _sort_key(key: tuple[Any, ...]) -> tuple[str, ...]:
    # Rows are written in key order so concurrent writers lock rows in the same order (no deadlocks).
    return tuple(f"{part:020d}" if isinstance(part, int) else str(part) for part in key)
