"""One small async SQL interface over PostgreSQL (asyncpg) and SQLite (embedded default).

Services write portable SQL with ``$1`` placeholders, ``BIGINT``/``TEXT``/``INTEGER`` columns and
``INSERT ... ON CONFLICT``; amounts are integer sub-units, quantities are decimal strings. Each service
owns its own schema (PostgreSQL) or its own file (SQLite).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import aiosqlite
import asyncpg

_PLACEHOLDER = re.compile(r"\$(\d+)")


class Connection(Protocol):
    async def execute(self, sql: str, *args: Any) -> None: ...
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None: ...
    async def fetchval(self, sql: str, *args: Any) -> Any: ...


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

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


class PostgresDatabase:
    dialect = "postgres"

    def __init__(self, url: str, schema: str, pool_size_max: int = 10) -> None:
        self._url = url
        self._schema = schema
        self._pool_size_max = pool_size_max
        self._pool: asyncpg.Pool | None = None

    async def connect(self) -> PostgresDatabase:
        conn = await asyncpg.connect(self._url)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self._url, min_size=1, max_size=self._pool_size_max,
            server_settings={"search_path": self._schema},
        )
        return self

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            yield _PgConnection(conn)

    async def executescript(self, ddl: str) -> None:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            # Serialise concurrent schema creation by several instances of one service.
            async with conn.transaction():
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


def serial_pk(dialect: str) -> str:
    return "BIGSERIAL PRIMARY KEY" if dialect == "postgres" else "INTEGER PRIMARY KEY AUTOINCREMENT"


async def open_database(service: str, settings: Any) -> Database:
    """PostgreSQL schema ``billing_<service>`` when DATABASE_URL is set, else ``<data_dir>/<service>.sqlite``."""
    if settings.database_url:
        return await PostgresDatabase(settings.database_url, settings.schema(service)).connect()
    return await SqliteDatabase(settings.data_dir / f"{service}.sqlite").connect()
