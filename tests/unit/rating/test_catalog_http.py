"""``POST /v1/catalog``: the documented example is published as given; a bad catalogue is refused with the
``invalid-catalog`` problem naming the field, and nothing reaches the ledger (embedded bus and database)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from billing_cli.main import app
from billing_events import topics
from billing_events.catalog import CATALOG_DOCUMENT_BYTES_MAX, EXAMPLE
from billing_rating.catalog_view import validate_document
from billing_rating.http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from httpx import ASGITransport, AsyncClient
from typer.testing import CliRunner

from tests.catalogue_sizes import padded
from tests.unit.rating.support import embedded_rating
from tests.unit.rating.test_rating_service import BASIC, CATALOG, subscribe

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


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


async def test_the_documented_example_is_published(rating: tuple[AsyncClient, EmbeddedBus]) -> None:
    client, bus = rating
    accepted = await client.post("/v1/catalog", headers=ADMIN, json=EXAMPLE)
    assert accepted.status_code == 202, accepted.text
    [command] = await commands(bus)
    assert command["kind"] == "catalog.publish"
    published = command["payload"]["document"]
    assert published == validate_document(EXAMPLE).model_dump(mode="json")
    pro = next(p for p in published["plans"] if p["code"] == "credits-pro")
    assert (pro["prices"], pro["minimum_spend"], pro["collection"]) == (
        {"EUR": {"base_fee": "92.00", "minimum_spend": "46.00"}}, "50.00", "charge_before_access")


@pytest.mark.parametrize(("body", "kind", "names"), [
    ({**EXAMPLE, "plans": [{"code": "solo", "name": "Solo", "base_fee": "9.00"}]}, "invalid-catalog",
     "plans.0.currency"),                                                              # required field missing
    ({**EXAMPLE, "plans": "starter"}, "invalid-catalog", "plans"),                     # wrong type
    ({**EXAMPLE, "credit_units": {"CREDIT": {"scale": "two"}}}, "invalid-catalog", "scale"),
    ({"meters": [{"code": "x", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "-1"}}]},
     "invalid-catalog", "negative"),                                                   # rating's price check
    ([EXAMPLE], "invalid-request", None),                                              # not an object
    ({}, "invalid-catalog", "no meters, plans or packages"),                           # would empty the catalogue
    ({"seller": {"name": "Acme"}, "tax_rules": []}, "invalid-catalog", "no meters, plans or packages"),
])
async def test_a_bad_catalogue_gets_its_problem_and_publishes_nothing(
        rating: tuple[AsyncClient, EmbeddedBus], body: Any, kind: str, names: str | None) -> None:
    client, bus = rating
    refused = await client.post("/v1/catalog", headers=ADMIN, json=body)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert refused.json()["type"] == PROBLEM_BASE + kind
    if names is not None:
        assert names in refused.json()["detail"]
    assert await commands(bus) == []


@pytest.fixture
async def subscribed(tmp_path: Path) -> AsyncIterator[tuple[AsyncClient, EmbeddedBus]]:
    """The routes on a rating service whose catalogue has the team plan, and a subscription to it."""
    async with embedded_rating(tmp_path) as (service, bus):
        await subscribe(service)  # team v1 charges api_calls, storage_gb, seats and logins
        api = create_app("t", Settings(data_dir=tmp_path))
        api.include_router(build_router(service))
        async with AsyncClient(transport=ASGITransport(app=api), base_url="http://rating") as client:
            yield client, bus


async def test_a_version_that_leaves_out_a_meter_a_live_plan_charges_is_refused(
        subscribed: tuple[AsyncClient, EmbeddedBus]) -> None:
    client, bus = subscribed
    body = {**CATALOG, "meters": [m for m in CATALOG["meters"] if m["code"] not in ("storage_gb", "seats")],
            "plans": [BASIC]}
    refused = await client.post("/v1/catalog", headers=ADMIN, json=body)
    assert refused.status_code == 422, refused.text
    assert refused.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert refused.json()["type"] == PROBLEM_BASE + "invalid-catalog"
    detail = refused.json()["detail"]
    assert "'seats' (charged by team v1)" in detail and "'storage_gb' (charged by team v1)" in detail
    assert await commands(bus) == []
    # Every meter the plan charges kept: published, the team plan left out (no longer sold, the subscription keeps
    # team v1), and so is a meter no plan charges (gpu_calls).
    kept = {**body, "meters": [m for m in CATALOG["meters"] if m["code"] != "gpu_calls"]}
    assert (await client.post("/v1/catalog", headers=ADMIN, json=kept)).status_code == 202
    [command] = await commands(bus)
    assert [p["code"] for p in command["payload"]["document"]["plans"]] == ["basic"]


def test_the_cli_refuses_what_the_route_refuses(tmp_path: Path) -> None:
    """`billing catalog apply` runs the same checks: a catalogue with nothing in it, and one that leaves out a meter
    of a live plan (rating's store in BILLING_DATA_DIR says which), are refused and nothing is sent."""
    async def subscribed_store() -> None:
        async with embedded_rating(tmp_path) as (service, _):
            await subscribe(service)

    asyncio.run(subscribed_store())
    env = {"BILLING_DATA_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}
    for catalog, named in [({"seller": {"name": "Acme"}}, "no meters, plans or packages"),
                           ({**CATALOG, "meters": [m for m in CATALOG["meters"] if m["code"] != "seats"]},
                            "'seats' (charged by team v1)")]:
        path = tmp_path / "catalog.yaml"
        path.write_text(yaml.safe_dump({"catalog": catalog}))
        result = CliRunner().invoke(app, ["catalog", "apply", str(path)], env=env)
        assert result.exit_code == 2, result.output
        assert named in result.output


async def test_a_catalogue_too_large_for_a_kafka_record_is_refused_with_413_naming_the_limit(
        rating: tuple[AsyncClient, EmbeddedBus]) -> None:
    """A body under the 1 MiB request limit can be a catalogue well above 1 MiB as published (every default filled
    in): sent, Kafka refused its command after the route had validated it (HTTP 500) or the ledger's event of it
    stopped the relay. Refused up front now, with the limit named; one at the limit is accepted."""
    client, bus = rating
    body = padded(EXAMPLE, CATALOG_DOCUMENT_BYTES_MAX + 50_000)
    assert len(json.dumps(body, separators=(",", ":"))) < CATALOG_DOCUMENT_BYTES_MAX  # the body itself is small
    refused = await client.post("/v1/catalog", headers=ADMIN, json=body)
    assert refused.status_code == 413, refused.text
    assert refused.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem = refused.json()
    assert (problem["type"], problem["bytes_max"]) == (PROBLEM_BASE + "catalog-too-large", CATALOG_DOCUMENT_BYTES_MAX)
    assert f"more than the {CATALOG_DOCUMENT_BYTES_MAX:,} bytes a catalogue may be" in problem["detail"]
    assert await commands(bus) == []
    largest = await client.post("/v1/catalog", headers=ADMIN, json=padded(EXAMPLE, CATALOG_DOCUMENT_BYTES_MAX))
    assert largest.status_code == 202, largest.text
    assert len(await commands(bus)) == 1


def test_the_cli_refuses_a_catalogue_too_large_for_a_kafka_record(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"catalog": padded(EXAMPLE, CATALOG_DOCUMENT_BYTES_MAX + 50_000)}))
    env = {"BILLING_DATA_DIR": str(tmp_path), "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}
    result = CliRunner().invoke(app, ["catalog", "apply", str(path)], env=env)
    assert result.exit_code == 2, result.output
    assert f"more than the {CATALOG_DOCUMENT_BYTES_MAX:,} bytes a catalogue may be" in result.output
    assert not (tmp_path / "bus.sqlite").exists()  # nothing sent
