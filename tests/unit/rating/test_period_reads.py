"""A period read back from rating (a tenant's closed lines, its rating decisions) is a month, as for a close: any
other value is a 422 problem+json, not an empty answer as if the tenant had nothing in it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from billing_rating.http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from httpx import ASGITransport, AsyncClient

from tests.unit.rating.support import embedded_rating

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[AsyncClient]:
    async with embedded_rating(tmp_path) as (service, _):
        api = create_app("t", Settings(data_dir=tmp_path))
        api.include_router(build_router(service))
        async with AsyncClient(transport=ASGITransport(app=api), base_url="http://rating") as client:
            yield client


@pytest.mark.parametrize("what", ["lines", "decisions"])
@pytest.mark.parametrize("period", ["garbage", "2026-13", "2026-1", "2026", "٢٠٢٦-11", "2026-11%0A"])
async def test_a_period_that_is_not_a_month_is_refused(client: AsyncClient, what: str, period: str) -> None:
    response = await client.get(f"/v1/rating/periods/{period}/accounts/acme/{what}", headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert response.json()["type"] == PROBLEM_BASE + "invalid-period"


@pytest.mark.parametrize("what", ["lines", "decisions"])
async def test_a_month_is_read_back(client: AsyncClient, what: str) -> None:
    response = await client.get(f"/v1/rating/periods/2026-11/accounts/acme/{what}", headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.json() == {"period": "2026-11", "tenant": "acme", what: []}
