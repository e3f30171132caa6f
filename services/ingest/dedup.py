"""Ingest's dedup memory: which (tenant, event id) were accepted, kept for the dedup window.

One batch costs one multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (which is the lookup too:
the keys it returns are new) and, only when some keys already existed, one multi-row ``UPDATE ...
RETURNING`` that claims rows remembered but never published (written by older versions, which recorded
first and published second). PostgreSQL gets the keys as arrays (``unnest``: one statement text whatever
the batch size, so it is prepared once); SQLite gets a multi-row ``VALUES`` list in chunks.

The caller runs ``claim`` and its publish in one transaction that commits after the publish: a row that
exists was published. Keys are claimed in sorted order so that two concurrent batches (Kafka consumer and
HTTP) lock overlapping keys in the same order and cannot deadlock; the loser of a race waits for the
winner's commit and then sees the key as a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from billing_events.timeutil import isoformat
from billing_runtime.db import Connection, Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_events (
    tenant TEXT NOT NULL, event_id TEXT NOT NULL, event_time TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, event_id));
CREATE INDEX IF NOT EXISTS seen_events_by_time ON seen_events (event_time);
"""

# SQLite statements carry 3 parameters per row; 1,000 rows stay far below its 32,766-parameter limit.
SQLITE_ROWS_PER_STATEMENT_MAX = 1000
# Rows are kept this much longer than the window: covers clock skew between instances and the allowed
# future skew of timestamps, so a deleted key can only come back as `too_old`, never as `accepted`.
CLEANUP_MARGIN = timedelta(days=1)

Key = tuple[str, str]  # (tenant, event id)

# Answers the keys that were already there (usually none), not the thousands it inserted.
_PG_INSERT = (
    "WITH input AS (SELECT u.t, u.e, u.ts FROM unnest($1::text[], $2::text[], $3::text[]) AS u(t, e, ts)), "
    "ins AS (INSERT INTO seen_events (tenant, event_id, event_time, published) SELECT t, e, ts, 1 FROM input "
    "ON CONFLICT DO NOTHING RETURNING tenant, event_id) "
    "SELECT t AS tenant, e AS event_id FROM input "
    "WHERE NOT EXISTS (SELECT 1 FROM ins WHERE ins.tenant = input.t AND ins.event_id = input.e)"
)
_PG_CLAIM_UNPUBLISHED = (
    "UPDATE seen_events AS s SET published = 1 FROM unnest($1::text[], $2::text[]) AS u(t, e) "
    "WHERE s.tenant = u.t AND s.event_id = u.e AND s.published = 0 RETURNING s.tenant, s.event_id"
)
_CLEANUP = (
    "DELETE FROM seen_events WHERE (tenant, event_id) IN (SELECT tenant, event_id FROM seen_events "
    "WHERE event_time < $1 ORDER BY event_time LIMIT $2) RETURNING event_id"
)


def _values(rows: int, columns: int, literal: str = "") -> str:
    return ", ".join(
        "(" + ", ".join(f"${r * columns + c + 1}" for c in range(columns)) + literal + ")" for r in range(rows))


async def claim(conn: Connection, dialect: str, events: Sequence[tuple[str, str, str]]) -> set[Key]:
    """Of ``events`` (tenant, event id, event time; keys unique), the keys to publish now.

    New keys are remembered (as published: the caller commits only after publishing); keys remembered but
    never published are claimed. Keys already published are left out: they are duplicates.
    """
    ordered = sorted(events)
    if not ordered:
        return set()
    if dialect == "postgres":
        tenants, event_ids, times = zip(*ordered, strict=True)
        rows = await conn.fetch(_PG_INSERT, tenants, event_ids, times)
        existing = [(r["tenant"], r["event_id"]) for r in rows]
        fresh = set(zip(tenants, event_ids, strict=True))
        if existing:
            fresh.difference_update(existing)
            claimed = await conn.fetch(_PG_CLAIM_UNPUBLISHED, [k[0] for k in existing], [k[1] for k in existing])
            fresh |= {(r["tenant"], r["event_id"]) for r in claimed}
        return fresh
    fresh = set()
    for start in range(0, len(ordered), SQLITE_ROWS_PER_STATEMENT_MAX):
        chunk = ordered[start:start + SQLITE_ROWS_PER_STATEMENT_MAX]
        new = await conn.fetch(
            "INSERT INTO seen_events (tenant, event_id, event_time, published) VALUES "
            + _values(len(chunk), 3, ", 1") + " ON CONFLICT DO NOTHING RETURNING tenant, event_id",
            *[v for e in chunk for v in e])
        added = {(r["tenant"], r["event_id"]) for r in new}
        existing = [(e[0], e[1]) for e in chunk if (e[0], e[1]) not in added]
        if existing:
            claimed = await conn.fetch(
                "UPDATE seen_events SET published = 1 WHERE published = 0 AND (tenant, event_id) IN (VALUES "
                + _values(len(existing), 2) + ") RETURNING tenant, event_id",
                *[v for k in existing for v in k])
            added |= {(r["tenant"], r["event_id"]) for r in claimed}
        fresh |= added
    return fresh


async def cleanup(db: Database, now: datetime, window: timedelta, rows_max: int, rows_per_run_max: int) -> int:
    """Deletes keys of events older than the window (plus margin), ``rows_max`` per statement (each its own
    short transaction), at most ``rows_per_run_max`` per call. Returns how many rows were deleted."""
    cutoff = isoformat(now - window - CLEANUP_MARGIN)
    deleted = 0
    while deleted < rows_per_run_max:
        async with db.transaction() as conn:
            rows = await conn.fetch(_CLEANUP, cutoff, min(rows_max, rows_per_run_max - deleted))
        deleted += len(rows)
        if len(rows) < rows_max:
            break
    return deleted
