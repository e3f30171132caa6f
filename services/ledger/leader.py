"""Leader election for the relay among several ledger processes: a PostgreSQL session advisory lock.

Several background tasks (relay, sweeper, scheduler) ask ``is_held`` concurrently; one asyncpg connection
runs one query at a time, so the questions are serialised.

One lock per store, ``<schema>_relay``, held by the process that relays: the relay process of a
``billing serve ledger`` (``relay_process.py``), or the service itself when it relays in process (the embedded
default has no lock: one process). The leader tasks of a service whose relay runs in a process of its own
(sweeper, scheduler, top-ups, alerts, dunning, card expiry, digest) follow their relay process's leadership
(``ReportedLeadership``): they run in the service whose relay holds the lock, as they always did. No second
lock: a ledger of an earlier version relaying in process during a rolling restart holds the same lock, so
neither a second relay nor a second set of leader tasks starts next to it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

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


# The relay process tells the service whether it holds the lock (``LeaderReports``), when that changes and at
# least this often; the service's leader tasks trust a report no older than LEADER_REPORT_STALE_SECONDS.
LEADER_REPORT_SECONDS = 0.5
LEADER_REPORT_STALE_SECONDS = 3.0


class LeaderReports:
    """In the relay process: writes whether it holds the lock (b"1" or b"0") to a pipe to the service."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._last: bool | None = None
        self._at = 0.0

    def report(self, held: bool) -> None:
        if self._fd is None:
            return
        now = time.monotonic()
        if held is self._last and now - self._at < LEADER_REPORT_SECONDS:
            return
        try:
            os.write(self._fd, b"1" if held else b"0")
        except OSError:  # the service is gone: the relay process stops when stdin closes
            self._fd = None
            return
        self._last, self._at = held, now


class ReportedLeadership:
    """In the service: leadership as its relay process last reported it (the lock is the relay process's).

    A daemon thread reads the reports from the pipe; ``is_held`` is True only while the latest report says held
    and is fresh, so a relay process that stopped reporting (stuck, or gone) stops the leader tasks here too.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._held = False
        self._at = 0.0
        threading.Thread(target=self._read, name="relay-leadership", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                reports = os.read(self._fd, 4096)
            except InterruptedError:
                continue
            except OSError:
                reports = b""
            if not reports:  # the relay process is gone (the service stops: see ChildProcess.run)
                self._held = False
                os.close(self._fd)
                return
            self._held, self._at = reports[-1:] == b"1", time.monotonic()

    async def is_held(self) -> bool:
        return self._held and time.monotonic() - self._at < LEADER_REPORT_STALE_SECONDS
