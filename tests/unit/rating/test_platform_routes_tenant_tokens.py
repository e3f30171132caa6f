"""Review (session 13) finding: platform-wide admin routes accept an admin token scoped to one tenant.

``require(Role.ADMIN)`` checks the role only. A customer's admin token (``tenant`` claim, as the payments tests
use for a tenant's own admin) publishes the whole catalogue (every tenant's prices), closes a billing period for
every account, and runs the subscription cycle of every tenant."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from billing_events import topics
from billing_events.catalog import EXAMPLE
from billing_rating.http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from httpx import ASGITransport, AsyncClient

from tests.unit.rating.support import embedded_rating

TENANT_ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin', tenant='acme')}"}


@pytest.fixture
async def rating(tmp_path: Path) -> AsyncIterator[tuple[AsyncClient, EmbeddedBus]]:
    async with embedded_rating(tmp_path) as (service, bus):
        api = create_app("t", Settings(data_dir=tmp_path))
        api.include_router(build_router(service))
        async with AsyncClient(transport=ASGITransport(app=api), base_url="http://rating") as client:
            yield client, bus


async def commands(bus: EmbeddedBus) -> list[dict[str, Any]]:
    rows = await bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY "offset"', topics.LEDGER_COMMANDS)
    return [json.loads(bytes(r["value"])) for r in rows]


async def test_a_tenants_admin_token_cannot_publish_the_catalogue(rating: tuple[AsyncClient, EmbeddedBus]) -> None:
    client, bus = rating
    free = {**EXAMPLE, "meters": [{**m, "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0"}}
                                  for m in EXAMPLE["meters"] if "price" in m]}
    refused = await client.post("/v1/catalog", headers=TENANT_ADMIN, json=free)
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert await commands(bus) == []  # nothing reaches the ledger


async def test_a_tenants_admin_token_cannot_close_a_period_for_everyone(
        rating: tuple[AsyncClient, EmbeddedBus]) -> None:
    client, _ = rating
    refused = await client.post("/v1/rating/periods/2026-01/close", headers=TENANT_ADMIN)
    assert refused.status_code == 403, refused.text
