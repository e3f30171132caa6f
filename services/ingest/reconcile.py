"""Ingest's part of ``billing reconcile usage``: the events it accepted, from its dedup memory (``seen_events``).

A row of ``seen_events`` is written in the transaction that commits after the event was published to
``billing.usage.accepted`` (``dedup``): a row is an accepted event. Rows written by versions before the claim
(``published = 0``: remembered first, published second) are counted too: rating's decision proves whether they
went out. Rows live for the dedup window plus ``dedup.CLEANUP_MARGIN``, by the event's own time: an event older
than the window may be forgotten already, so the window is what can be reconciled (``window_start``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta

from billing_events.reconciliation import Accepted
from billing_events.timeutil import isoformat
from billing_runtime.db import Database

# Rows read per statement (keyset pages by event id): a tenant's window is read in bounded pieces.
PAGE_ROWS_MAX = 5000
# Event ids per lookup statement (SQLite allows 32,766 parameters).
LOOKUP_IDS_MAX = 500


def window_start(now: datetime, dedup_window: timedelta) -> datetime:
    """The oldest event time whose dedup row is certainly still there (the cleanup deletes only older ones)."""
    return now - dedup_window


async def tenants(db: Database, only: str | None = None) -> list[str]:
    """Tenants ingest knows (accounts opened) or remembers events of, sorted; ``only``: just that one, if known."""
    if only is not None:
        known = await db.fetchval("SELECT 1 FROM known_tenants WHERE tenant = $1", only) or \
            await db.fetchval("SELECT 1 FROM seen_events WHERE tenant = $1 LIMIT 1", only)
        return [only] if known else []
    rows = await db.fetch("SELECT tenant FROM known_tenants UNION SELECT DISTINCT tenant FROM seen_events")
    return sorted(r["tenant"] for r in rows)


async def accepted(db: Database, tenant: str, since: datetime, until: datetime) -> AsyncIterator[list[Accepted]]:
    """The tenant's accepted events with ``since <= event time < until``, in pages of ``PAGE_ROWS_MAX``."""
    after = ""
    while True:
        rows = await db.fetch(
            "SELECT event_id, event_time FROM seen_events WHERE tenant = $1 AND event_time >= $2 AND event_time < $3 "
            "AND event_id > $4 ORDER BY event_id LIMIT $5", tenant, isoformat(since), isoformat(until), after,
            PAGE_ROWS_MAX)
        if rows:
            yield [Accepted(tenant, r["event_id"], datetime.fromisoformat(r["event_time"])) for r in rows]
        if len(rows) < PAGE_ROWS_MAX:
            return
        after = rows[-1]["event_id"]


async def remembered(db: Database, tenant: str, event_ids: Iterable[str]) -> set[str]:
    """Of ``event_ids``, those ingest accepted for ``tenant`` (whatever their time)."""
    wanted = sorted(set(event_ids))
    found: set[str] = set()
    for start in range(0, len(wanted), LOOKUP_IDS_MAX):
        chunk = wanted[start:start + LOOKUP_IDS_MAX]
        marks = ", ".join(f"${i + 2}" for i in range(len(chunk)))
        rows = await db.fetch(f"SELECT event_id FROM seen_events WHERE tenant = $1 AND event_id IN ({marks})",
                              tenant, *chunk)
        found.update(r["event_id"] for r in rows)
    return found
