"""Churn, NRR and MRR movements per month, fed the ledger's real events (its own commands) through the service."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_projections import lists
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.db import Database
from billing_runtime.http import create_app

from tests.unit.projections.conftest import apply, dumps_by_batching, sqlite_service
from tests.unit.projections.ledger_events import Ledger, analytics_scenario
from tests.unit.projections.test_api import SETTINGS, auth

MONTHS = ["2026-08", "2026-09", "2026-10"]
FIGURES = ("accounts_start", "accounts_new", "accounts_churned", "accounts_end", "mrr_start", "mrr_new",
           "mrr_expansion", "mrr_contraction", "mrr_churned", "mrr_end", "logo_churn_rate", "revenue_churn_rate",
           "net_revenue_retention")


@pytest.fixture
async def fed(service: ProjectionService) -> Database:
    ledger = Ledger()
    analytics_scenario(ledger)
    await apply(service, ledger.records())
    return service.db


async def _months(db: Database, tenant: str | None = None, months: list[str] = MONTHS) -> dict[tuple[str, str], Any]:
    rows = await lists.analytics(db, tenant=tenant, months=months, now=datetime.now(UTC))
    return {(r["month"], r["currency"]): r for r in rows}


def _figures(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[name] for name in FIGURES)


async def test_each_months_new_expansion_contraction_churn_and_retention_per_currency(fed: Database) -> None:
    found = await _months(fed)
    assert sorted(found) == [(m, c) for m in MONTHS for c in ("EUR", "USD")]  # never added together
    # August: every customer is new (live from Aug 1 00:00, not before it); the trial pays nothing yet.
    assert _figures(found[("2026-08", "USD")]) == (0, 8, 0, 8, "0.00", "310.00", "0.00", "0.00", "0.00", "310.00",
                                                   None, None, None)
    # September, from 8 customers and 310.00: new fresh 10 + tryout's converted trial 20 (flash started and
    # canceled within the month: nothing); expansion up +40, zigzag +10 (x 5 then x 2: only the net); contraction
    # down -50, both -10 (one of its two subscriptions canceled: still a customer); churned gone 30 (canceled),
    # nap 100 (paused); late is past_due, still billed: no movement; ends cancels at its period's end, Oct 1.
    sep = found[("2026-09", "USD")]
    assert _figures(sep) == (8, 2, 2, 8, "310.00", "30.00", "50.00", "60.00", "130.00", "200.00",
                             "0.2500", "0.6129", "0.5484")  # 2/8; (60 + 130)/310; (310 + 50 - 60 - 130)/310
    # October: nap resumed (back as new: it was not live on Oct 1), ends canceled as of Oct 1 (its tick a day late).
    assert _figures(found[("2026-10", "USD")]) == (8, 1, 1, 8, "200.00", "100.00", "0.00", "0.00", "10.00",
                                                   "290.00", "0.1250", "0.0500", "0.9500")
    assert _figures(found[("2026-09", "EUR")]) == (1, 0, 0, 1, "30.00", "0.00", "30.00", "0.00", "0.00", "60.00",
                                                   "0.0000", "0.0000", "2.0000")
    for row in found.values():  # each month's movements explain its end from its start
        moved = (Decimal(row["mrr_start"]) + Decimal(row["mrr_new"]) + Decimal(row["mrr_expansion"])
                 - Decimal(row["mrr_contraction"]) - Decimal(row["mrr_churned"]))
        assert moved == Decimal(row["mrr_end"]), row
        assert row["complete"] is True
    assert found[("2026-09", "USD")]["mrr_end"] == found[("2026-10", "USD")]["mrr_start"]


async def test_each_customers_month_nets_out_its_changes(fed: Database) -> None:
    async def september(tenant: str) -> tuple[Any, ...] | None:
        row = (await _months(fed, tenant)).get(("2026-09", "USD"))
        return None if row is None else tuple(row[k] for k in ("mrr_start", "mrr_new", "mrr_expansion",
                                                                "mrr_contraction", "mrr_churned", "mrr_end"))

    assert await september("up") == ("10.00", "0.00", "40.00", "0.00", "0.00", "50.00")  # upgraded
    assert await september("down") == ("100.00", "0.00", "0.00", "50.00", "0.00", "50.00")  # downgraded
    assert await september("zigzag") == ("10.00", "0.00", "10.00", "0.00", "0.00", "20.00")  # up 40, down 30
    assert await september("gone") == ("30.00", "0.00", "0.00", "0.00", "30.00", "0.00")  # canceled
    assert await september("nap") == ("100.00", "0.00", "0.00", "0.00", "100.00", "0.00")  # paused
    assert await september("late") == ("10.00", "0.00", "0.00", "0.00", "0.00", "10.00")  # past_due: still billed
    assert await september("tryout") == ("0.00", "20.00", "0.00", "0.00", "0.00", "20.00")  # trial converted
    assert await september("ends") == ("10.00", "0.00", "0.00", "0.00", "0.00", "10.00")  # ends on Oct 1
    assert await _months(fed, "flash") == {}  # started and canceled in the same month: never live at an end
    nap = await _months(fed, "nap", ["2026-10"])
    assert (nap[("2026-10", "USD")]["accounts_new"], nap[("2026-10", "USD")]["mrr_new"]) == (1, "100.00")


async def test_the_month_under_way_ends_at_mrr_now(fed: Database) -> None:
    now = datetime.now(UTC)
    this_month = f"{now.year:04d}-{now.month:02d}"
    rows = await lists.analytics(fed, tenant=None, months=lists.analytics_months(None, None, now), now=now)
    current = {r["currency"]: r for r in rows if r["month"] == this_month}
    mrr = {m["currency"]: m["mrr"] for m in await lists.mrr(fed, tenant=None)}
    assert {code: row["mrr_end"] for code, row in current.items()} == mrr == {"EUR": "60.00", "USD": "290.00"}
    assert not any(row["complete"] for row in current.values())


async def test_a_third_of_a_quarter_is_rounded_once_per_figure(tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=datetime(2026, 8, 1, tzinfo=UTC), digest="q", document={"plans": [
        {"code": "q", "name": "Q", "currency": "USD", "base_fee": "100.00", "cadence": "quarter"}]})
    for i in range(3):
        ledger.command("account.open", f"t{i}", at=datetime(2026, 8, 1, tzinfo=UTC), currency="USD")
        ledger.command("subscription.create", f"t{i}", at=datetime(2026, 8, 1, tzinfo=UTC), key="q", plan="q")
    ledger.command("subscription.cancel", "t0", at=datetime(2026, 9, 9, tzinfo=UTC), key="q", immediately=True)
    async with sqlite_service(tmp_path / "q.sqlite") as service:
        await apply(service, ledger.records())
        sep = (await _months(service.db, months=["2026-09"]))[("2026-09", "USD")]
    # 3 x 100/3 is 100.00 (each customer rounded first: 99.99); one of three churned: 33.33, 66.67 left.
    assert (sep["mrr_start"], sep["mrr_churned"], sep["mrr_end"]) == ("100.00", "33.33", "66.67")
    assert (sep["logo_churn_rate"], sep["revenue_churn_rate"], sep["net_revenue_retention"]) == (
        "0.3333", "0.3333", "0.6667")


async def test_batch_boundaries_and_replays_leave_the_changes_as_they_were(tmp_path: Path) -> None:
    ledger = Ledger()
    analytics_scenario(ledger)
    dumps = await dumps_by_batching(ledger.records(), tmp_path, seed=13, size_max=5, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]
    assert len(dumps[0]["subscription_changes"]) == 26  # 13 starts, 13 changes of status or price


@pytest.fixture
async def client(fed: Database) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app("projections", SETTINGS)
    for router in build_routers(fed):
        app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


ROUTE = "/v1/reports/subscriptions/analytics"


async def test_the_report_in_json_and_csv_for_finance(client: httpx.AsyncClient) -> None:
    finance = auth("finance")
    body = (await client.get(ROUTE, headers=finance, params={"from": "2026-08", "to": "2026-10"})).json()
    assert body["months"] == MONTHS
    sep = next(r for r in body["items"] if (r["month"], r["currency"]) == ("2026-09", "USD"))
    assert (sep["mrr_churned"], sep["logo_churn_rate"], sep["net_revenue_retention"]) == ("130.00", "0.2500", "0.5484")
    exported = await client.get(ROUTE, headers=finance, params={"from": "2026-08", "to": "2026-10", "format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["month"], r["currency"]) for r in rows] == [(r["month"], r["currency"]) for r in body["items"]]
    assert rows[0]["logo_churn_rate"] == "" and rows[3]["mrr_churned"] == "130.00"  # Aug: nothing live at its start
    scoped = (await client.get(ROUTE, headers=auth("finance", "nap"), params={"from": "2026-09", "to": "2026-10"})
              ).json()["items"]
    assert [(r["month"], r["mrr_churned"], r["mrr_new"]) for r in scoped] == [("2026-09", "100.00", "0.00"),
                                                                            ("2026-10", "0.00", "100.00")]
    default = (await client.get(ROUTE, headers=finance)).json()
    now = datetime.now(UTC)
    assert len(default["months"]) == 12 and default["months"][-1] == f"{now.year:04d}-{now.month:02d}"


@pytest.mark.parametrize(("params", "parameter"), [
    ({"from": "2026-9"}, "from"), ({"to": "2026-13"}, "to"), ({"from": "٢٠٢٦-09"}, "from"),
    ({"to": "2026-09\n"}, "to"), ({"from": "1969-12", "to": "1970-01"}, "from"), ({"to": "9999-01"}, "to"),
    ({"from": "2026-10", "to": "2026-09"}, "from"), ({"from": "2023-01", "to": "2026-01"}, "from"),
    ({"format": "xml"}, "format"),
])
async def test_bad_months_are_refused_with_a_problem(client: httpx.AsyncClient, params: dict[str, str],
                                                     parameter: str) -> None:
    refused = await client.get(ROUTE, headers=auth("finance"), params=params)
    assert refused.status_code == 422 and refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["errors"][0]["location"] == f"query.{parameter}", refused.json()


async def test_only_finance_and_admin_and_a_tenant_token_only_its_own(client: httpx.AsyncClient) -> None:
    assert (await client.get(ROUTE, headers=auth("viewer", "up"))).status_code == 403
    other = await client.get(ROUTE, headers=auth("finance", "up"), params={"tenant": "down"})
    assert other.status_code == 403 and other.headers["content-type"].startswith("application/problem+json")
    assert (await client.get(ROUTE, headers=auth("admin"))).status_code == 200


async def test_the_finance_page_shows_the_reports_months(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard/finance", headers=auth("finance"), params={"year": 2026, "month": 10})
    assert page.status_code == 200
    assert page.text.count('data-testid="analytics-row"') == 6  # Aug, Sep, Oct x USD, EUR (Nov 2025 - Oct 2026)
    row = page.text.split('data-month="2026-09" data-currency="USD"')[1].split("</tr>")[0]
    assert 'data-testid="analytics-mrr_churned">130.00<' in row and 'data-testid="analytics-mrr_end">200.00<' in row
    assert 'data-ratio="0.2500">25.00 %<' in row and 'data-ratio="0.5484">54.84 %<' in row
