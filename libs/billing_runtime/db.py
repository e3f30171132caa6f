"""One small async SQL interface over PostgreSQL (asyncpg) and SQLite (embedded default).

Services write portable SQL with ``$1`` placeholders, ``BIGINT``/``TEXT``/``INTEGER`` columns and
``INSERT ... ON CONFLICT``; amounts are integer sub-units, quantities are decimal strings. Each service
owns its own schema (PostgreSQL) or its own file (SQLite).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg

_PLACEHOLDER = re.compile(r"\$(\d+)")

# Rows for ``copy_records``: a list, any iterable, or an async iterable that yields them as they are made.
Records = Iterable[Sequence[Any]] | AsyncIterable[Sequence[Any]]


class Connection(Protocol):
    async def execute(self, sql: str, *args: Any) -> None: ...
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def copy_records(self, table: str, columns: Sequence[str], rows: Records) -> None: ...


class Database(Protocol):
    dialect: str

    def transaction(self) -> Any: ...  # async context manager yielding a Connection
    async def execute(self, sql: str, *args: Any) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...
    async def close(self) -> None: ...


def _sqlite_args(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(str(a) if isinstance(a, Decimal) else a for a in args)


class _SqliteConnection:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), _sqlite_args(args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(_PLACEHOLDER.sub(r"?\1", sql), [_sqlite_args(r) for r in rows])

    async def copy_records(self, table: str, columns: Sequence[str], rows: Records) -> None:
        """Appends rows (a plain ``INSERT`` each: SQLite has no faster bulk path, nor needs one here)."""
        if isinstance(rows, AsyncIterable):
            rows = [row async for row in rows]
        rows = list(rows)
        if rows:
            await self.executemany(_insert_sql(table, columns), rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self._conn.execute(_PLACEHOLDER.sub(r"?\1", sql), _sqlite_args(args)) as cursor:
            rows = await cursor.fetchall()
        return [dict(r) for r in rows]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None


class SqliteDatabase:
    """One connection, one writer at a time (SQLite's own model), WAL for crash safety."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> SqliteDatabase:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = await aiosqlite.connect(self._path, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        await self._conn.execute("PRAGMA journal_mode=WAL")
        await self._conn.execute("PRAGMA synchronous=FULL")
        return self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        assert self._conn is not None
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteConnection(self._conn)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def executescript(self, ddl: str) -> None:
        assert self._conn is not None
        async with self._lock:
            await self._conn.executescript(ddl)

    async def execute(self, sql: str, *args: Any) -> None:
        async with self.transaction() as conn:
            await conn.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        assert self._conn is not None
        async with self._lock:
            return await _SqliteConnection(self._conn).fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return next(iter(row.values())) if row else None

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None


class _PgConnection:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def copy_records(self, table: str, columns: Sequence[str], rows: Records) -> None:
        """Appends rows with ``COPY ... FROM STDIN (FORMAT binary)``: several times cheaper than ``executemany``
        of an ``INSERT``, for the client and for the server (one statement, no per-row execution).

        Rows from an async iterable are sent while they are produced (asyncpg writes every 512 KiB), so the
        server stores the first rows while the caller still computes the last ones. Like a plain ``INSERT`` it
        has no ``ON CONFLICT``: a row that violates a constraint fails the whole ``COPY`` (and the
        transaction). Values must have the columns' types (``str`` for ``TEXT``, ``int`` for
        ``BIGINT``/``INTEGER``, ``None`` for ``NULL``). The table is looked up on the search path.
        """
        if not isinstance(rows, AsyncIterable):
            rows = list(rows)
            if not rows:
                return
        await self._conn.copy_records_to_table(table, columns=list(columns), records=rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """A pool's ``reset`` for connections that never change session state (``reset_sessions=False``)."""


class PostgresDatabase:
    dialect = "postgres"

    def __init__(self, url: str, schema: str, pool_size_max: int = 10, *, pool_size_min: int = 1,
                 reset_sessions: bool = True) -> None:
        """``reset_sessions=False`` is for pools whose connections never change session state (single
        statements: no ``SET``, ``LISTEN``, advisory locks, cursors or temporary tables outside a transaction),
        such as a query API's. asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
        RESET ALL``) is a second round trip, and a second wake-up of the server's backend, on every release;
        without it a read is one round trip. A transaction left open is still rolled back and a broken
        connection still dropped; reads still see committed rows only."""
        self._url = url
        self._schema = schema
        self._pool_size_max = pool_size_max
        self._pool_size_min = pool_size_min
        self._reset_sessions = reset_sessions
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> PostgresDatabase:
        conn = await asyncpg.connect(self._url)
        try:
            await ensure_schema(conn, self._schema)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._url, min_size=self._pool_size_min, max_size=self._pool_size_max,
            server_settings={"search_path": self._schema},
            **({} if self._reset_sessions else {"reset": _nothing_to_reset}),
        )
        return self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgConnection(conn)

    async def executescript(self, ddl: str) -> None:
        assert self._pool is not None
        # Serialise concurrent schema creation by several instances of one service.
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._schema)
            await conn.execute(ddl)

    async def execute(self, sql: str, *args: Any) -> None:
        assert self._pool is not None
        await self._pool.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        assert self._pool is not None
        return [dict(r) for r in await self._pool.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        assert self._pool is not None
        row = await self._pool.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        assert self._pool is not None
        return await self._pool.fetchval(sql, *args)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def ensure_schema(conn: asyncpg.Connection, schema: str) -> None:
    """``CREATE SCHEMA IF NOT EXISTS``, safe when several processes start at once: run concurrently, PostgreSQL
    fails all but one with a duplicate key in ``pg_namespace``. A transaction-scoped advisory lock per schema
    makes the others wait, then find it there."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('billing schema'), hashtext($1))", schema)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def is_unique_violation(exc: BaseException, constraint: str) -> bool:
    """True when ``exc`` is a unique-key violation of ``constraint`` (PostgreSQL: its name, e.g.
    ``rated_events_pkey``), or any unique-key violation on SQLite (which does not name the constraint)."""
    if isinstance(exc, asyncpg.UniqueViolationError):
        return exc.constraint_name == constraint
    return isinstance(exc, sqlite3.IntegrityError) and "UNIQUE constraint failed" in str(exc)


def _insert_sql(table: str, columns: Sequence[str]) -> str:
    marks = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"


def serial_pk(dialect: str) -> str:
    return "BIGSERIAL PRIMARY KEY" if dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"


async def open_database(service: str, settings: Any) -> Database:
    """PostgreSQL schema ``billing_<service>`` when DATABASE_URL is set, else ``<data_dir>/<service>.sqlite``."""
    if settings.database_url:
        return await PostgresDatabase(settings.database_url, settings.schema(service)).connect()
    return await SqliteDatabase(settings.data_dir / f"{service}.sqlite").connect()
