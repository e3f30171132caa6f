"""``POST /v1/rating/periods/{YYYY-MM}/close``: a calendar month (UTC) is closed once it has ended; the current
month or a future one is refused with the ``period-not-ended`` problem and nothing is closed (embedded bus and
database, the route's clock set)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_rating import http as rating_http
from billing_rating.close import lines_of
from billing_rating.http import build_router
from billing_rating.service import RatingService
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from httpx import ASGITransport, AsyncClient

from tests.unit.rating.support import embedded_rating
from tests.unit.rating.test_rating_service import CATALOG, accepted, published

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}
NOV_22 = datetime(2026, 11, 22, 10, tzinfo=UTC)
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)

Rating = tuple[AsyncClient, RatingService, EmbeddedBus, Callable[[datetime], None]]


@pytest.fixture
async def rating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rating]:
    """The routes on a rating service with ``CATALOG`` published; the last item sets the routes' clock."""
    def set_clock(at: datetime) -> None:
        monkeypatch.setattr(rating_http, "_now", lambda: at)

    set_clock(NOV_22)
    async with embedded_rating(tmp_path) as (service, bus):
        catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2,
                              type="Catalog.Published", recorded_at=NOV_22, data={"version": 1, "document": CATALOG})
        await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
        api = create_app("t", Settings(data_dir=tmp_path))
        api.include_router(build_router(service))
        async with AsyncClient(transport=ASGITransport(app=api), base_url="http://rating") as client:
            yield client, service, bus, set_clock


@pytest.mark.parametrize("period", ["2026-11", "2026-12", "2027-01"])
async def test_a_month_that_has_not_ended_is_not_closed(rating: Rating, period: str) -> None:
    client, service, bus, _ = rating
    # active_users: priced at close, late_policy reject.
    await service.handle_accepted([accepted("u1", "1", "active_users", at=NOV_22 - timedelta(days=1), user="ann")])
    refused = await client.post(f"/v1/rating/periods/{period}/close", headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert refused.json()["type"] == PROBLEM_BASE + "period-not-ended"
    assert f"{period} has not ended yet" in refused.json()["detail"]
    assert await lines_of(service.db, period) == []
    # The rest of November is still November's usage: not refused as late (period_closed).
    await service.handle_accepted([accepted("u2", "1", "active_users", at=NOV_22 + timedelta(hours=1), user="bob")])
    assert await published(bus, topics.USAGE_REJECTED) == []


@pytest.mark.parametrize("period", ["\u0662\u0660\u0662\u0666-10", "2026-10\n", "2026-1", "2026-13"])
async def test_a_period_that_is_not_an_ascii_month_is_refused(rating: Rating, period: str) -> None:
    client, service, _, _ = rating
    refused = await client.post(f"/v1/rating/periods/{quote(period)}/close", headers=ADMIN)
    assert refused.status_code == 422, refused.text
    assert refused.json()["type"] == PROBLEM_BASE + "invalid-period"
    assert await lines_of(service.db, "2026-10") == []


async def test_a_month_is_closed_from_its_end_on(rating: Rating) -> None:
    client, service, _, set_clock = rating
    await service.handle_accepted([
        accepted("u1", "1", "active_users", at=NOV_22, user="ann"),
        accepted("u2", "1", "active_users", at=DEC_1 - timedelta(microseconds=1), user="bob")])
    set_clock(DEC_1 - timedelta(microseconds=1))
    assert (await client.post("/v1/rating/periods/2026-11/close", headers=ADMIN)).status_code == 422
    set_clock(DEC_1)
    closed = await client.post("/v1/rating/periods/2026-11/close", headers=ADMIN)
    assert closed.status_code == 200, closed.text
    [line] = closed.json()["lines"]
    assert (line["meter"], line["quantity"], line["amount"]) == ("active_users", "2", "2.000000000")
