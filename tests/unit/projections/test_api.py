"""The query API over the read models: shapes, filters, cursors, CSV, tenant scoping, problem+json."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal

import httpx
import pytest
from billing_projections import api_models
from billing_projections.http import build_routers
from billing_projections.params import encode_cursor
from billing_projections.service import ProjectionService
from billing_runtime.auth import mint_token
from billing_runtime.db import Database
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi import FastAPI

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, full_scenario, simple_account

SETTINGS = Settings()


def auth(role: str, tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SETTINGS, role=role, tenant=tenant)}"}


def projections_app(db: Database) -> FastAPI:
    app = create_app("projections", SETTINGS)
    for router in build_routers(db):
        app.include_router(router)
    return app


@asynccontextmanager
async def api_client(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=projections_app(db))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
async def client(service: ProjectionService) -> AsyncIterator[httpx.AsyncClient]:
    ledger = Ledger()
    full_scenario(ledger, "acme")
    simple_account(ledger, "globex", debits=120)
    await apply(service, ledger.records())
    async with api_client(service.db) as c:
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


async def test_a_bad_filter_on_a_csv_export_is_the_same_422_problem_as_its_json_form(
        client: httpx.AsyncClient) -> None:
    """Checked before the response starts (it was a 200 text/csv with the header line, then a broken stream)."""
    admin = auth("admin")
    for path, bad in (("/v1/accounts/acme/transactions", {"type": "bogus"}),
                      ("/v1/reports/transactions", {"type": "bogus"}),
                      ("/v1/accounts/acme/invoices", {"status": "bogus"}),
                      ("/v1/accounts/acme/invoices", {"period": "2026-13"}),
                      ("/v1/reports/invoices", {"type": "bill"}),
                      ("/v1/reports/subscriptions", {"status": "bogus"})):
        as_json = await client.get(path, params=bad, headers=admin)
        assert as_json.status_code == 422, (path, bad)
        for asked in ({"params": {**bad, "format": "csv"}, "headers": admin},
                      {"params": bad, "headers": {**admin, "Accept": "text/csv"}}):
            as_csv = await client.get(path, **asked)  # type: ignore[arg-type]
            assert as_csv.status_code == 422, (path, asked, as_csv.text)
            assert as_csv.headers["content-type"].startswith("application/problem+json")
            assert as_csv.json() == as_json.json()
    dashboard = await client.get("/dashboard/accounts/acme/export/transactions.csv", params={"type": "bogus"},
                                 headers=admin)
    assert dashboard.status_code == 422 and "bogus" in dashboard.json()["detail"]


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


async def test_monthly_usage_pages_neither_repeat_nor_skip_a_row_added_between_two_reads(
        service: ProjectionService) -> None:
    """Keyset cursors: a row added before the page read last (it was an offset: the next page repeated a row)."""
    ledger = Ledger()
    full_scenario(ledger, "acme")
    simple_account(ledger, "globex", debits=3)
    await apply(service, ledger.records())
    finance = auth("finance")

    def key(row: dict[str, object]) -> tuple[object, ...]:
        return row["year"], row["month"], row["tenant"], row["meter"], row["unit"]

    async with api_client(service.db) as client:
        before = (await client.get("/v1/reports/usage/monthly", params={"limit": 500}, headers=finance)).json()
        first = (await client.get("/v1/reports/usage/monthly", params={"limit": 2}, headers=finance)).json()
        paged, cursor = [key(r) for r in first["items"]], first["next_cursor"]
        assert paged == [key(r) for r in before["items"][:2]] and paged[0][2] == "acme"
        # Between two reads, November usage of a tenant sorting before the rows read ("aaa") and of one after ("zzz").
        for tenant in ("aaa", "zzz"):
            simple_account(ledger, tenant, debits=1, start=datetime(2026, 11, 5, tzinfo=UTC))
        await apply(service, ledger.records())
        while cursor:
            page = (await client.get("/v1/reports/usage/monthly", params={"limit": 2, "cursor": cursor},
                                     headers=finance)).json()
            paged += [key(r) for r in page["items"]]
            cursor = page["next_cursor"]
        after = (await client.get("/v1/reports/usage/monthly", params={"limit": 500}, headers=finance)).json()
        assert len(after["items"]) == len(before["items"]) + 2
        # Every row once, in order: all that were there, and the one added ahead of the cursor.
        assert paged == [key(r) for r in after["items"] if r["tenant"] != "aaa"]
        assert len(set(paged)) == len(paged)
        # An offset cursor (what this list returned before session 12) is refused, not read as another position.
        old = await client.get("/v1/accounts/acme/usage/monthly", params={"cursor": encode_cursor({"offset": 2})},
                               headers=finance)
        assert old.status_code == 422 and old.headers["content-type"].startswith("application/problem+json")
        assert "first page" in old.json()["detail"]


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


async def test_the_chargeback_report_takes_its_month_as_period_like_the_other_reports(
        client: httpx.AsyncClient) -> None:
    """``period=YYYY-MM`` as the other reports take a month (it took only integer ``year`` and ``month``, which still
    work); both forms, neither, half of the old one or a bad month is a 422 problem naming the forms."""
    finance = auth("finance")
    by_period = await client.get("/v1/reports/chargeback", params={"period": "2026-10"}, headers=finance)
    assert by_period.status_code == 200, by_period.text
    by_year = await client.get("/v1/reports/chargeback", params={"year": 2026, "month": 10}, headers=finance)
    assert by_period.json() == by_year.json() and {i["tenant"] for i in by_period.json()["items"]} == {"acme", "globex"}
    as_csv = await client.get("/v1/reports/chargeback", params={"period": "2026-10", "format": "csv"}, headers=finance)
    assert as_csv.status_code == 200 and "chargeback-2026-10" in as_csv.headers["content-disposition"]
    for params in ({"period": "2026-10", "year": 2026, "month": 10}, {}, {"year": 2026}, {"period": "2026-13"},
                   {"period": "10/2026"}, {"period": ""}):
        refused = await client.get("/v1/reports/chargeback", params=params, headers=finance)
        assert refused.status_code == 422, (params, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "YYYY-MM" in refused.json()["detail"], params


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
