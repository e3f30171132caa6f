"""The query API's own PostgreSQL pool: reads only, one round trip per query.

``billing_runtime.db.PostgresDatabase`` returns a connection to its pool with ``Connection.reset()``, which
sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on EVERY release: a second round
trip to the server, and a second wake-up of its backend process, for every one-query read. On a busy machine
each wake-up is a chance to wait for a core, and that wait is what a read's p99 is made of.

The API's connections never change session state: they run single ``SELECT`` statements (no ``SET``, no
``LISTEN``, no advisory locks, no cursors outside a transaction, no temporary tables), so there is nothing to
reset. asyncpg still rolls back a transaction left open (``Connection._reset``, no round trip when there is
none) and drops a connection that failed. Reads see committed rows only (READ COMMITTED, autocommit), exactly
as through the shared pool; asyncpg keeps each connection's prepared statements, so a repeated query is
parsed and planned once per connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from billing_projections.limits import READ_POOL_CONNECTIONS_MAX, READ_POOL_CONNECTIONS_MIN
from billing_runtime.db import Connection


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """The pool's ``reset``: nothing (see the module's docstring)."""


class _ReadConnection:
    """``billing_runtime.db.Connection`` over one pooled asyncpg connection (inside ``transaction``)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> None:
        await self._conn.execute(sql, *args)

    async def executemany(self, sql: str, rows: Any) -> None:
        await self._conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


class ReadDatabase:
    """``billing_runtime.db.Database`` over a read-only asyncpg pool on the projections schema."""

    dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def connect(cls, url: str, schema: str) -> ReadDatabase:
        pool = await asyncpg.create_pool(
            url, min_size=READ_POOL_CONNECTIONS_MIN, max_size=READ_POOL_CONNECTIONS_MAX,
            server_settings={"search_path": schema}, reset=_nothing_to_reset)
        return cls(pool)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield _ReadConnection(conn)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._pool.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._pool.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._pool.fetchrow(sql, *args)
        return dict(row) if row is not None else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._pool.fetchval(sql, *args)

    async def close(self) -> None:
        await self._pool.close()
