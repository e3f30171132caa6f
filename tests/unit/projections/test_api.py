"""The query API over the read models: shapes, filters, cursors, CSV, tenant scoping, problem+json."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from billing_projections import api_models
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.auth import mint_token
from billing_runtime.http import create_app
from billing_runtime.settings import Settings

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, full_scenario, simple_account

SETTINGS = Settings()


def auth(role: str, tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SETTINGS, role=role, tenant=tenant)}"}


@pytest.fixture
async def client(service: ProjectionService) -> AsyncIterator[httpx.AsyncClient]:
    ledger = Ledger()
    full_scenario(ledger, "acme")
    simple_account(ledger, "globex", debits=120)
    await apply(service, ledger.records())
    app = create_app("projections", SETTINGS)
    for router in build_routers(service.db):
        app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_balance_keeps_its_shape_and_adds_expiry_and_low_balance(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/accounts/acme/balance", headers=auth("viewer", "acme"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant"] == "acme" and body["currency"] == "USD" and body["position"] > 0
    usd = next(w for w in body["wallets"] if w["unit"] == "USD")
    assert {"available", "held", "balance", "receivable"} <= set(usd)
    assert (usd["balance"], usd["held"], usd["available"]) == ("1.00", "1.00", "0.00")
    # Served without response-model validation (the hot path): it must be exactly the model's shape.
    assert api_models.Balance.model_validate(body).model_dump(mode="json") == body
    assert usd["low_balance"] is True and usd["low_balance_threshold"] == "50.00"
    credit = next(w for w in body["wallets"] if w["unit"] == "CREDIT")
    assert credit["available"] == "750.00"


async def test_tenant_token_sees_only_its_tenant(client: httpx.AsyncClient) -> None:
    for path in ("balance", "grants", "transactions", "usage/monthly", "usage/ai", "figures"):
        r = await client.get(f"/v1/accounts/acme/{path}", headers=auth("viewer", "globex"))
        assert r.status_code == 403, path
        assert r.headers["content-type"].startswith("application/problem+json")
    assert (await client.get("/v1/accounts/acme/balance")).status_code == 401
    assert (await client.get("/v1/reports/figures", headers=auth("viewer"))).status_code == 403
    scoped = await client.get("/v1/reports/usage/monthly?tenant=acme", headers=auth("finance", "globex"))
    assert scoped.status_code == 403
    own = await client.get("/v1/reports/usage/monthly", headers=auth("finance", "globex"))
    assert {row["tenant"] for row in own.json()["items"]} == {"globex"}


async def test_unknown_account_is_404_problem(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/accounts/nobody/transactions", headers=auth("admin"))
    assert r.status_code == 404 and r.json()["type"].endswith("unknown-account")


async def test_transactions_paginate_with_a_cursor_and_filter(client: httpx.AsyncClient) -> None:
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "7"} | ({"cursor": cursor} if cursor else {})
        r = await client.get("/v1/accounts/globex/transactions", params=params, headers=auth("viewer", "globex"))
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [t["position"] for t in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 121 and seen == sorted(seen, reverse=True) and len(set(seen)) == 121
    usage = await client.get("/v1/accounts/globex/transactions", headers=auth("admin"),
                             params={"type": "usage", "user": "user-1", "limit": 500})
    items = usage.json()["items"]
    assert len(items) == 40 and all(t["type"] == "usage" and t["user"] == "user-1" for t in items)
    assert items[0]["amount"] == "-0.20" and items[0]["event_ids"]
    window = await client.get("/v1/accounts/acme/transactions", headers=auth("admin"),
                              params={"from": "2026-11-01", "to": "2026-11-02T00:00:00Z", "limit": 500})
    assert window.json()["items"] and all(t["occurred_at"].startswith("2026-11-01") for t in window.json()["items"])


async def test_bad_parameters_are_problems_that_change_nothing(client: httpx.AsyncClient) -> None:
    for params in ({"cursor": "garbage"}, {"from": "yesterday"}, {"type": "teleport"}, {"limit": "0"},
                   {"format": "xml"}):
        r = await client.get("/v1/accounts/acme/transactions", params=params, headers=auth("admin"))
        assert r.status_code == 422, (params, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_a_grant_status_filter_is_one_of_the_statuses_or_a_problem(client: httpx.AsyncClient) -> None:
    everything = (await client.get("/v1/accounts/acme/grants", headers=auth("admin"))).json()["items"]
    for status in ("open", "expired", "voided"):
        r = await client.get("/v1/accounts/acme/grants", params={"status": status}, headers=auth("admin"))
        assert r.status_code == 200
        assert r.json()["items"] == [g for g in everything if g["status"] == status]
    for status in ("bogus", "OPEN", "open,expired"):  # not an empty list, as if acme had no such grant
        r = await client.get("/v1/accounts/acme/grants", params={"status": status}, headers=auth("admin"))
        assert r.status_code == 422, (status, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["errors"][0]["location"] == "query.status" and "known: open, expired, voided" in r.text


async def test_monthly_usage_and_ai_usage(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/accounts/acme/usage/monthly", params={"year": 2026, "month": 11, "meter": "ai_tokens"},
                         headers=auth("viewer", "acme"))
    assert r.json()["items"] == [{"tenant": "acme", "year": 2026, "month": 11, "meter": "ai_tokens",
                                  "usage_type": "ai", "meter_name": "AI tokens", "unit_of_measure": "token", "quantity": "1500",
                                  "unit": "USD", "cost": "0.000003", "events": 2}]
    ai = await client.get("/v1/accounts/acme/usage/ai", params={"group_by": "model,user"},
                          headers=auth("viewer", "acme"))
    rows = {(i["model"], i["user"]): i for i in ai.json()["items"]}
    assert rows[("gpt-large", "bob")]["input_tokens"] == "1000" and rows[("gpt-large", "bob")]["cost"] == "0.0000024"


async def test_csv_export_of_lists(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/accounts/globex/transactions?format=csv", headers=auth("viewer", "globex"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 121 and rows[0]["type"] == "usage" and rows[-1]["type"] == "grant"
    accept = await client.get("/v1/reports/chargeback?year=2026&month=10",
                              headers={**auth("finance"), "Accept": "text/csv"})
    lines = list(csv.DictReader(io.StringIO(accept.text)))
    assert {line["tenant"] for line in lines} == {"acme", "globex"}
    assert sum(float(line["share_percent"]) for line in lines if line["unit"] == "USD") == pytest.approx(100, abs=0.02)


async def test_reports_for_finance(client: httpx.AsyncClient) -> None:
    figures = (await client.get("/v1/reports/figures", params={"year": 2026, "month": 10},
                                headers=auth("finance"))).json()
    usd = next(f for f in figures["items"] if f["unit"] == "USD")
    assert usd["period"] == "2026-10" and usd["top_ups"] == "100.00" and usd["tax_collected"] == "20.00"
    assert usd["consumed"] == "28.60"  # acme 4.60 + globex 120 x 0.20
    daily = (await client.get("/v1/reports/figures", params={"granularity": "day", "from": "2026-10-30",
                                                              "to": "2026-10-31"}, headers=auth("admin"))).json()
    assert {f["period"] for f in daily["items"]} == {"2026-10-30"}
    accounts = (await client.get("/v1/reports/accounts", headers=auth("finance"))).json()["items"]
    assert [a["tenant"] for a in accounts] == ["acme", "globex"]
    ledger = (await client.get("/v1/reports/ledger?tenant=acme", headers=auth("finance"))).json()["items"]
    assert sum(Decimal(x["balance"]) for x in ledger if x["unit"] == "USD") == 0  # double entry
