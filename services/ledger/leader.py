"""Leader election for the relay among several ledger processes: a PostgreSQL session advisory lock.

Several background tasks (relay, sweeper, scheduler) ask ``is_held`` concurrently; one asyncpg connection
runs one query at a time, so the questions are serialised.
"""

from __future__ import annotations

import asyncio

import asyncpg


class AdvisoryLock:
    def __init__(self, database_url: str, name: str) -> None:
        self._url = database_url
        self._name = name
        self._conn: asyncpg.Connection | None = None
        self._held = False
        self._asking = asyncio.Lock()

    async def is_held(self) -> bool:
        async with self._asking:
            return await self._ask()

    async def _ask(self) -> bool:
        try:
            if self._conn is None or self._conn.is_closed():
                self._held = False
                self._conn = await asyncpg.connect(self._url)
            if not self._held:
                self._held = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", self._name))
            else:
                await self._conn.fetchval("SELECT 1")  # still connected means still held
            return self._held
        except (OSError, asyncpg.PostgresError):
            self._held = False
            self._conn = None
            return False
