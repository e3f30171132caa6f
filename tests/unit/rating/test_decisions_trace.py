"""``GET /v1/rating/periods/{period}/accounts/{tenant}/decisions``: every decision of a tenant's period, priced,
dead-lettered or refused by the ledger, with its inputs and (for a refusal) its reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_rating.http import build_router
from billing_rating.service import RatingService
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from httpx import ASGITransport, AsyncClient

from tests.unit.rating.support import embedded_rating
from tests.unit.rating.test_rating_service import CATALOG, accepted, published, subscribe
from tests.unit.rating.test_refused_debits import CATALOG as BLOCK_CATALOG
from tests.unit.rating.test_refused_debits import docs, refused

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
async def rating_api(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> AsyncIterator[tuple[RatingService, EmbeddedBus, AsyncClient]]:
    async with embedded_rating(tmp_path) as (service, bus):
        catalog = LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2,
                              type="Catalog.Published", recorded_at=datetime.now(UTC),
                              data={"version": 1, "document": request.param})
        await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, None, catalog.to_json())])
        api = create_app("t", Settings(data_dir=tmp_path))
        api.include_router(build_router(service))
        async with AsyncClient(transport=ASGITransport(app=api, raise_app_exceptions=False),
                               base_url="http://rating") as client:
            yield service, bus, client


async def decisions(client: AsyncClient) -> dict[str, dict[str, object]]:
    response = await client.get("/v1/rating/periods/2026-11/accounts/acme/decisions", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {d["event_id"]: d for d in response.json()["decisions"]}


@pytest.mark.parametrize("rating_api", [CATALOG], indirect=True, ids=["catalog"])
async def test_the_decisions_trace_lists_a_dead_lettered_event_next_to_priced_ones(rating_api) -> None:  # type: ignore[no-untyped-def]
    service, _bus, client = rating_api
    await service.handle_accepted([
        accepted("ok-1", "1500", "ai_tokens", model="small", operation="chat", user="ann",
                 input_tokens=1000, output_tokens=500),
        accepted("bad-1", "10", "ai_tokens", model="mystery", operation="chat", user="ann", input_tokens=10),
    ])
    found = await decisions(client)
    assert found["ok-1"]["decision"] == "priced" and found["ok-1"]["model"] == "small"
    assert found["ok-1"]["reason"] is None
    assert found["bad-1"]["decision"] == "no_price" and found["bad-1"]["reason"] == "no_price"
    assert (found["bad-1"]["model"], found["bad-1"]["user"]) == ("mystery", "ann")


@pytest.mark.parametrize("rating_api", [BLOCK_CATALOG], indirect=True, ids=["block"])
async def test_the_decisions_trace_shows_a_debit_the_ledger_refused_as_refused(rating_api) -> None:  # type: ignore[no-untyped-def]
    service, bus, client = rating_api
    await service.handle_accepted([docs("doc-1", "10")])
    await service.handle_accepted([docs("doc-2", "10")])
    first = (await published(bus))[0]
    await service.handle_ledger_events([refused(first, 10)])
    found = await decisions(client)
    assert (found["doc-1"]["decision"], found["doc-1"]["reason"]) == ("refused", "insufficient_credit")
    assert Decimal(str(found["doc-1"]["refusal_adjustment"])) == 500  # doc-2 was priced 0 on the inflated total
    assert (found["doc-2"]["decision"], found["doc-2"]["reason"]) == ("priced", None)


@pytest.mark.parametrize("rating_api", [CATALOG], indirect=True, ids=["catalog"])
async def test_a_subscription_periods_decisions_are_read_by_its_start_in_any_offset_and_a_bad_period_is_refused(
        rating_api) -> None:  # type: ignore[no-untyped-def]
    """A subscription period is named by its start (as an invoice line's trace names it): the same instant written
    with ``Z`` finds the same decisions; a start without an offset, or anything else, is a 422 problem naming the
    forms it takes, as is any other text."""
    service, _bus, client = rating_api
    start, end = datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC)
    await subscribe(service, started=start, period=(start, end))
    await service.handle_accepted([accepted("a1", "150", at=datetime(2026, 11, 3, tzinfo=UTC))])
    for period in ("2026-11-02T00:00:00%2B00:00", "2026-11-02T00:00:00Z", "2026-11-02T01:00:00%2B01:00"):
        response = await client.get(f"/v1/rating/periods/{period}/accounts/acme/decisions", headers=ADMIN)
        assert response.status_code == 200, (period, response.text)
        assert [d["event_id"] for d in response.json()["decisions"]] == ["a1"], period
    lines = await client.get("/v1/rating/periods/2026-11-02T00:00:00Z/accounts/acme/lines", headers=ADMIN)
    assert (lines.status_code, lines.json()["lines"]) == (200, [])  # not closed yet
    for period in ("2026-11-02T00:00:00", "2026-13", "november", "2026-11-02"):
        refused_read = await client.get(f"/v1/rating/periods/{period}/accounts/acme/decisions", headers=ADMIN)
        assert refused_read.status_code == 422, (period, refused_read.text)
        assert refused_read.headers["content-type"].startswith("application/problem+json")
        assert refused_read.json()["type"].endswith("invalid-period") and "2026-11-02T00:00:00+00:00" in \
            refused_read.json()["detail"]
