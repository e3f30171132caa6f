"""``POST /v1/usage`` details: gzip bodies, size limits, tenant-scoped tokens, per-event results."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from billing_events import topics
from billing_runtime.auth import mint_token
from billing_runtime.settings import Settings

from tests.unit.ingest.harness import TENANT, Ingest


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[Ingest]:
    ingest = await Ingest(tmp_path, settings=Settings(data_dir=tmp_path, http_body_bytes_max=4096)).start()
    yield ingest
    await ingest.stop()


def headers(ingest: Ingest, tenant: str | None = None, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(ingest.settings, role='service', tenant=tenant)}", **extra}


def event(event_id: str, tenant: str = TENANT) -> dict[str, str]:
    return {"id": event_id, "tenant": tenant, "meter": "api_calls", "quantity": "2",
            "timestamp": datetime.now(UTC).isoformat()}


async def test_a_gzip_body_is_accepted(ingest: Ingest) -> None:
    body = gzip.compress(json.dumps({"events": [event("g1"), event("g2")]}).encode())
    response = await ingest.http.post("/v1/usage", content=body, headers=headers(ingest, **{
        "Content-Encoding": "gzip", "Content-Type": "application/json"}))
    assert response.status_code == 200, response.text
    assert response.json()["accepted"] == 2


async def test_a_body_that_inflates_beyond_the_limit_is_refused_and_changes_nothing(ingest: Ingest) -> None:
    events = [event(f"big-{i}") for i in range(200)]  # ~30 KB of JSON, well under 4 KB gzipped
    body = gzip.compress(json.dumps(events).encode())
    assert len(body) < 4096
    response = await ingest.http.post("/v1/usage", content=body, headers=headers(ingest, **{
        "Content-Encoding": "gzip"}))
    assert response.status_code == 413
    assert await ingest.published(topics.USAGE_ACCEPTED) == []


async def test_a_raw_body_beyond_the_limit_is_refused(ingest: Ingest) -> None:
    response = await ingest.http.post("/v1/usage", content=b" " * 5000, headers=headers(ingest))
    assert response.status_code == 413
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_broken_gzip_body_is_a_400_problem(ingest: Ingest) -> None:
    response = await ingest.http.post("/v1/usage", content=b"not gzip", headers=headers(ingest, **{
        "Content-Encoding": "gzip"}))
    assert response.status_code == 400


async def test_a_tenant_token_cannot_send_another_tenants_usage(ingest: Ingest) -> None:
    response = await ingest.http.post("/v1/usage", json=[event("t1"), event("t2", tenant="globex")],
                                      headers=headers(ingest, tenant=TENANT))
    assert response.status_code == 403
    assert await ingest.published(topics.USAGE_ACCEPTED) == []


async def test_a_json_string_is_not_an_event_even_if_it_contains_one(ingest: Ingest) -> None:
    response = await ingest.http.post("/v1/usage", json=[json.dumps(event("s1"))], headers=headers(ingest))
    assert response.status_code == 200
    assert response.json()["results"][0]["reason"] == "schema_invalid"
    assert await ingest.published(topics.USAGE_ACCEPTED) == []


async def test_usage_and_webhooks_keep_their_own_body_limits_above_the_apps_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "limits", http_default_body_bytes_max=1024, http_body_bytes_max=4096,
                        webhook_body_bytes_max=3000)
    (tmp_path / "limits").mkdir()
    small = await Ingest(tmp_path / "limits", settings=settings).start()
    try:
        events = [event(f"batch-{i}") for i in range(20)]
        body = json.dumps(events).encode()
        assert 1024 < len(body) <= 4096
        response = await small.http.post("/v1/usage", content=body, headers=headers(small))
        assert response.status_code == 200 and response.json()["accepted"] == 20
        refused = await small.http.post("/v1/usage", content=b" " * 5000, headers=headers(small))
        assert refused.status_code == 413 and refused.json()["detail"] == "Bodies are limited to 4096 bytes."
        # A webhook body above the app's default reaches the route (an unknown gateway: 404), one above its own
        # limit does not.
        webhook = await small.http.post("/v1/webhooks/nope", content=b" " * 2000)
        assert webhook.status_code == 404
        webhook = await small.http.post("/v1/webhooks/nope", content=b" " * 3001)
        assert webhook.status_code == 413 and webhook.json()["detail"] == "Bodies are limited to 3000 bytes."
        # Any other path holds to the default.
        other = await small.http.post("/v1/nowhere", content=b" " * 1025)
        assert other.status_code == 413 and other.json()["detail"] == "Bodies are limited to 1024 bytes."
    finally:
        await small.stop()


async def test_a_quantity_in_other_digits_or_with_spaces_is_rejected_not_counted(ingest: Ingest) -> None:
    events = [{**event(f"digits-{i}"), "quantity": quantity} for i, quantity in enumerate(["١٢", " 12 ", "+12"])]
    response = await ingest.http.post("/v1/usage", json=events, headers=headers(ingest))
    assert response.status_code == 200
    assert response.json()["accepted"] == 0 and response.json()["rejected"] == 3
    assert {r["reason"] for r in response.json()["results"]} == {"invalid_quantity"}
    assert await ingest.published(topics.USAGE_ACCEPTED) == []
    assert len(await ingest.published(topics.USAGE_REJECTED)) == 3
