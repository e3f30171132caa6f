"""CSV exports: every row of a list however long, streamed a page at a time (exports.py)."""

from __future__ import annotations

import asyncio
import csv
import io
import tracemalloc
from typing import Any

from billing_projections.limits import CSV_PAGE_ITEMS
from billing_projections.service import ProjectionService

from tests.unit.projections.test_api import auth, projections_app

SUBSCRIPTIONS = 100_001  # one more than the 100,000 rows an export stopped at, silently, before session 12


async def _stream(app: Any, path: str, query: str, headers: dict[str, str]) -> tuple[int, int, int, str]:
    """Drives the ASGI app as a server does, keeping none of the body: (status, bytes, lines, last line)."""
    done = asyncio.Event()
    status, size, lines, tail = 0, 0, 0, ""

    async def receive() -> dict[str, Any]:
        if not getattr(receive, "sent", False):
            receive.sent = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, size, lines, tail
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"").decode()
            size, lines = size + len(chunk), lines + chunk.count("\r\n")
            tail = (tail + chunk)[-400:]

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"test")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "server": ("test", 80), "client": ("127.0.0.1", 1)}
    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return status, size, lines, tail.rstrip("\r\n").rsplit("\r\n", 1)[-1]


async def _peak(app: Any, query: str) -> tuple[tuple[int, int, int, str], int]:
    """An export's outcome and the most memory it held at once (bytes traced)."""
    tracemalloc.start()
    try:
        outcome = await _stream(app, "/v1/reports/subscriptions", query, auth("finance"))
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_an_export_past_the_old_100000_row_cap_has_every_row_holding_a_page_at_a_time(
        service: ProjectionService) -> None:
    # The read model's rows as the projection writes them (100,001 Subscription.Started through the ledger: minutes):
    # tenant "bulk" past the old cap, tenant "one" a page.
    columns = ("subscription_id", "tenant", "subscription_key", "status", "plan_code", "cadence", "currency",
               "base_fee", "quantity", "started_at", "cancel_at_period_end", "last_position")
    rows = [(f"{tenant}-{i:06d}", tenant, f"key-{i:06d}", "active", "team", "month", "USD", "30.00", 1,
             "2026-11-01T00:00:00.000000Z", 0, i)
            for tenant, count in (("bulk", SUBSCRIPTIONS), ("one", CSV_PAGE_ITEMS)) for i in range(count)]
    async with service.db.transaction() as conn:
        await conn.executemany(f"INSERT INTO subscriptions ({', '.join(columns)}) "
                               f"VALUES ({', '.join(f'${i + 1}' for i in range(len(columns)))})", rows)
    del rows
    app = projections_app(service.db)
    (status, _, lines, _), _ = await _peak(app, "format=csv&tenant=one")  # warm (first request's one-off objects)
    assert (status, lines) == (200, 1 + CSV_PAGE_ITEMS)
    _, one_page = await _peak(app, "format=csv&tenant=one")
    (status, size, lines, last), every_page = await _peak(app, "format=csv&tenant=bulk")
    assert status == 200
    assert lines == 1 + SUBSCRIPTIONS  # the header and every row: nothing cut
    assert next(csv.DictReader(io.StringIO("subscription_id\r\n" + last)))["subscription_id"] == (
        f"bulk-{SUBSCRIPTIONS - 1:06d}")
    # Memory: a page's, whatever the length (~100 pages here, the CSV ~10 MB).
    assert every_page < 2 * one_page and every_page < size / 2, (one_page, every_page, size)
