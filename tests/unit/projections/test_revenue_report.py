"""The revenue report (``GET /v1/reports/revenue``): a month's deferred-revenue roll-forward and recognised revenue,
summed from the ledger's postings dated in it; a closed month reads the same after later events and after a rebuild.
Fed the ledger's real events (its own aggregate and commands)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events import ids
from billing_events.money import is_currency_code
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.sweeper import Sweeper
from billing_projections import revenue
from billing_projections.api_reports import REVENUE_COLUMNS
from billing_projections.service import ProjectionService
from billing_projections.views import REVENUE_ROWS
from billing_runtime.bus import Record

from tests.unit.projections.conftest import apply, dumps_by_batching, sqlite_service
from tests.unit.projections.ledger_events import (
    CLOSE_CATALOG,
    CLOSE_NOV_1,
    CLOSE_OCT_1,
    Ledger,
    U,
    analytics_scenario,
    full_scenario,
    month_end_later,
    month_end_scenario,
    simple_account,
    subscription_scenario,
)
from tests.unit.projections.test_api import api_client, auth
from tests.unit.projections.test_credit_package_figures import credit_packages, used_package
from tests.unit.projections.test_dashboard_pages import serving, text_of
from tests.unit.projections.test_dispute_read_models import disputed_top_ups
from tests.unit.projections.test_subscription_invoice_figures import PAID_AT, gateway_refund, subscribed

POOL = ("tenant_wallet", "deferred_revenue")


def _when(data: dict[str, Any]) -> str:
    """The day an event's postings are dated (its ``at``, else its ``effective_at``), YYYY-MM-DD in UTC."""
    return str(data.get("at") or data.get("effective_at"))[:10]


def ledger_postings(records: list[Record], tenant: str) -> list[tuple[str, dict[str, Any]]]:
    """(day, posting) of every posting of ``tenant``'s account events, straight from the relayed records."""
    found, account = [], str(ids.account_id(tenant))
    for record in records:
        event = json.loads(record.value)
        if event["aggregate_id"] == account:
            found += [(_when(event["data"]), p) for p in event["data"].get("postings") or []]
    return found


def booked(postings: list[tuple[str, dict[str, Any]]], unit: str, accounts: tuple[str, ...], *, since: str = "",
           until: str = "9999") -> int:
    """The signed sum (debit positive) of the postings on ``accounts`` in ``unit`` dated in [since, until)."""
    return sum(int(p["amount"]) for day, p in postings
               if p["unit"] == unit and p["account"] in accounts and since <= day < until)


def money(line: dict[str, Any], name: str) -> int:
    return int(Decimal(line[name]) * U)


async def report(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    r = await client.get("/v1/reports/revenue", params=params, headers=auth("finance"))
    assert r.status_code == 200, r.text
    return r.json()


def line(body: dict[str, Any], unit: str = "USD", tenant: str | None = None) -> dict[str, Any]:
    [found] = [i for i in body["items"] if i["unit"] == unit and i.get("tenant") == tenant]
    return found


async def test_octobers_close_reads_the_same_after_novembers_events_and_after_a_rebuild(
        service: ProjectionService, tmp_path: Path) -> None:
    ledger = Ledger()
    month_end_scenario(ledger)
    october_records = ledger.records()
    await apply(service, october_records)
    async with api_client(service.db) as client:
        closed = await report(client, period="2026-10")
        assert (closed["period"], closed["start"], closed["end"], closed["complete"], closed["as_at"]) == (
            "2026-10", "2026-10-01", "2026-11-01", True, None)
        usd = line(closed)
        # The roll-forward: what came into deferred revenue and what left it, as the ledger posted it in October.
        assert {k: usd[k] for k in ("opening_deferred", "credit_sold", "promotional", "fees_billed", "recognised_usage",
                                   "breakage", "refunds", "chargebacks", "other", "closing_deferred")} == {
            "opening_deferred": "0.00", "credit_sold": "100.00",  # the 19.00 of tax is owed to the state, not revenue
            "promotional": "10.00", "fees_billed": "31.00", "recognised_usage": "4.00", "breakage": "6.00",
            "refunds": "0.00", "chargebacks": "0.00", "other": "0.00", "closing_deferred": "100.00"}
        # The fee's 31 days, to its last: Oct 31's share, recognised by the run at the period's end (Nov 1), is dated
        # Oct 31. Before, it was dated when that run ran: 30.000347222 in October, 0.999652778 in November.
        assert usd["recognised_fees"] == "31.00"
        assert (usd["recognised_revenue"], usd["revenue_usage"], usd["revenue_fees"], usd["breakage_revenue"],
                usd["promotional_expense"]) == ("35.00", "4.00", "31.00", "6.00", "10.00")
        ins = sum(money(usd, k) for k in revenue.FLOWS_IN)
        outs = sum(money(usd, k) for k in revenue.FLOWS_OUT)
        assert money(usd, "closing_deferred") == money(usd, "opening_deferred") + ins - outs
        # Every figure is what the ledger's own postings dated in October say.
        postings = ledger_postings(october_records, "close")
        october = {"since": "2026-10-01", "until": "2026-11-01"}
        assert money(usd, "closing_deferred") == -booked(postings, "USD", POOL, until="2026-11-01")
        assert money(usd, "recognised_revenue") == -booked(postings, "USD", ("recognised_revenue",), **october)
        assert money(usd, "breakage_revenue") == -booked(postings, "USD", ("breakage",), **october)
        assert money(usd, "promotional_expense") == booked(postings, "USD", ("promotional_expense",), **october)

        month_end_later(ledger)
        later_records = ledger.records()
        await apply(service, later_records)
        assert await report(client, period="2026-10") == closed
        november = line(await report(client, period="2026-11"))
        assert november["opening_deferred"] == usd["closing_deferred"]
        # None of October's fee: November's own is recognised from the run of Dec 2 on (none here).
        assert (november["fees_billed"], november["recognised_fees"], november["refunds"], november["recognised_usage"],
                november["closing_deferred"]) == ("31.00", "0.00", "10.00", "2.00", "119.00")
        everything = october_records + later_records
        assert money(november, "closing_deferred") == -booked(ledger_postings(everything, "close"), "USD", POOL)

    # A rebuild (every record replayed into empty tables, one batch or in random slices) gives the same close.
    dumps = await dumps_by_batching(everything, tmp_path / "rebuilt", seed=3, size_max=4, replay_all=True)
    assert dumps[0] == dumps[1] == dumps[2]
    async with sqlite_service(tmp_path / "again.sqlite") as rebuilt:
        await apply(rebuilt, everything, batch=10_000)
        async with api_client(rebuilt.db) as client:
            assert await report(client, period="2026-10") == closed


async def test_a_monthly_fee_over_october_is_octobers_revenue_to_its_last_day_and_none_of_it_novembers(
        service: ProjectionService) -> None:
    """Team, 31.00 for October (1.00 a day), recognised by the ledger's own sweeper at the first sweep of each day:
    October's close has all 31 days and November none of them. Before, the run at 00:00:05 that recognised a day was
    dated in the next one, so October's last day (0.99994213) was November's revenue."""
    ledger = Ledger()
    ledger.command("catalog.publish", None, at=CLOSE_OCT_1, document=CLOSE_CATALOG, digest="close-1")
    ledger.command("account.open", "fee", at=CLOSE_OCT_1, currency="USD")
    ledger.command("subscription.create", "fee", at=CLOSE_OCT_1, key="m", plan="team", quantity=1)
    sweeper = Sweeper(ledger.app)
    first_sweep = timedelta(seconds=5)
    for day in range(1, 32):  # Oct 2 ... Nov 1, each recognising the day before
        assert sweeper.sweep(CLOSE_OCT_1 + timedelta(days=day) + first_sweep) == 1
    # November: the renewal bills its 31.00 (30 days), the sweep of Nov 2 recognises Nov 1.
    ledger.command("subscription.tick", "fee", at=CLOSE_NOV_1, key="m")
    ledger.command("invoice.usage_lines", "fee", at=CLOSE_NOV_1 + timedelta(minutes=1), lines=[],
                   invoice_key=f"{subscription_id('fee', 'm')}/{CLOSE_NOV_1.isoformat()}")
    assert sweeper.sweep(CLOSE_NOV_1 + timedelta(days=1) + first_sweep) == 1
    await apply(service, ledger.records())
    async with api_client(service.db) as client:
        october = line(await report(client, period="2026-10"))
        assert (october["fees_billed"], october["recognised_fees"], october["revenue_fees"],
                october["recognised_revenue"], october["closing_deferred"]) == ("31.00", "31.00", "31.00", "31.00",
                                                                                "0.00")
        # Each day's share in its own day: as at Oct 15, 15 days.
        assert line(await report(client, at="2026-10-15"))["recognised_fees"] == "15.00"
        assert line(await report(client, at="2026-10-30"))["recognised_fees"] == "30.00"
        november = line(await report(client, period="2026-11"))
        # Nov 1's share of November's 31.00 alone (31.00 x 86,400 / 2,592,000 s, rounded down): none of October's.
        assert (november["opening_deferred"], november["fees_billed"], november["recognised_fees"],
                november["closing_deferred"]) == ("0.00", "31.00", "1.033333333", "29.966666667")


async def test_as_at_a_day_is_its_month_up_to_the_end_of_that_day(service: ProjectionService) -> None:
    ledger = Ledger()
    month_end_scenario(ledger)
    month_end_later(ledger)
    records = ledger.records()
    await apply(service, records)
    async with api_client(service.db) as client:
        mid = await report(client, at="2026-10-15")
        assert (mid["period"], mid["as_at"], mid["start"], mid["end"], mid["complete"]) == (
            "2026-10", "2026-10-15", "2026-10-01", "2026-10-16", True)
        usd = line(mid)
        # Oct 1-15 of the fee (the run of Oct 16 recognised them, each day's share dated in it), before the
        # promotion's expiry (Oct 21): 100 + 10 + 31 - 4 - 15.
        assert (usd["recognised_fees"], usd["breakage"], usd["closing_deferred"]) == ("15.00", "0.00", "122.00")
        assert money(usd, "closing_deferred") == -booked(ledger_postings(records, "close"), "USD", POOL,
                                                         until="2026-10-16")
        month_end = await report(client, at="2026-10-31")
        whole = await report(client, period="2026-10")
        assert month_end["items"] == whole["items"] and month_end["end"] == whole["end"] == "2026-11-01"


async def test_lines_by_tenant_add_up_to_the_units_lines_and_a_tenants_token_sees_its_own(
        service: ProjectionService) -> None:
    ledger = Ledger()
    month_end_scenario(ledger, "close")
    month_end_scenario(ledger, "other", catalog=False)
    simple_account(ledger, "promo-only", debits=5)  # 100.00 of promotion on Oct 30, 5 x 0.20 used
    await apply(service, ledger.records())
    async with api_client(service.db) as client:
        per_unit = line(await report(client, period="2026-10"))
        by_tenant = await report(client, period="2026-10", by="tenant")
        lines = [i for i in by_tenant["items"] if i["unit"] == "USD"]
        assert [i["tenant"] for i in lines] == ["close", "other", "promo-only"]
        for name in revenue.REPORT_AMOUNTS:
            assert sum(Decimal(i[name]) for i in lines) == Decimal(per_unit[name]), name
        assert line(by_tenant, tenant="promo-only")["recognised_revenue"] == "1.00"
        own = await client.get("/v1/reports/revenue", params={"period": "2026-10", "by": "tenant"},
                               headers=auth("finance", "other"))
        assert [(i["tenant"], i["unit"]) for i in own.json()["items"]] == [("other", "USD")]
        assert own.json()["items"][0] == line(by_tenant, tenant="other")
        refused = await client.get("/v1/reports/revenue", params={"tenant": "close"}, headers=auth("finance", "other"))
        assert refused.status_code == 403
        assert (await client.get("/v1/reports/revenue", headers=auth("viewer"))).status_code == 403
        exported = await client.get("/v1/reports/revenue", params={"period": "2026-10", "format": "csv"},
                                    headers=auth("finance"))
        assert exported.headers["content-type"].startswith("text/csv")
        assert 'filename="revenue-2026-10.csv"' in exported.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert tuple(rows[0]) == REVENUE_COLUMNS
        assert [dict(r, tenant=None) for r in rows if r["unit"] == "USD"] == [
            {c: (None if c == "tenant" else str(per_unit[c])) for c in REVENUE_COLUMNS}]


@pytest.mark.parametrize(("params", "parameter"), [
    ({"period": "2026-13"}, "period"), ({"period": "٢٠٢٦-10"}, "period"), ({"period": "1969-12"}, "period"),
    ({"period": "2026-10\n"}, "period"), ({"period": "9999-12"}, "period"), ({"at": "2026-10-32"}, "at"),
    ({"at": "20261031"}, "at"), ({"at": "9999-12-31"}, "at"), ({"at": "2026-10-31T00:00:00Z"}, "at"),
    ({"period": "2026-10", "at": "2026-10-31"}, "at"), ({"by": "unit"}, "by"), ({"format": "xml"}, "format"),
])
async def test_a_bad_parameter_is_a_problem_naming_it(service: ProjectionService, params: dict[str, str],
                                                      parameter: str) -> None:
    async with api_client(service.db) as client:
        r = await client.get("/v1/reports/revenue", params=params, headers=auth("finance"))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert [e["location"] for e in r.json()["errors"]] == [f"query.{parameter}"]


def _subscriptions(ledger: Ledger) -> None:
    subscription_scenario(ledger)


def _credit_note_and_refund(ledger: Ledger) -> None:
    invoice = subscribed(ledger)
    ledger.command("subscription.change", "acme", at=PAID_AT + timedelta(days=1), key="m", quantity=1)
    gateway_refund(ledger, invoice, "107.10", "re_all")


def _everything(ledger: Ledger) -> None:
    full_scenario(ledger, "acme")
    simple_account(ledger, "globex", debits=7)


@pytest.mark.parametrize("scenario", [
    _everything, _subscriptions, _credit_note_and_refund, credit_packages, used_package, disputed_top_ups,
    analytics_scenario, lambda ledger: (month_end_scenario(ledger), month_end_later(ledger)),
], ids=["movements", "subscriptions", "credit-note-refund", "credit-packages", "package-used", "disputes",
        "analytics", "month-end"])
async def test_every_movement_is_classified_and_the_totals_are_the_ledgers_books(
        service: ProjectionService, scenario: Callable[[Ledger], Any]) -> None:
    """Over all time, per tenant and unit: no movement lands in ``other`` (each kind the ledger posts has its flow),
    deferred revenue is the liability accounts' balance the ledger's postings leave, and the revenue, breakage and
    promotional expense are those accounts' balances."""
    ledger = Ledger()
    scenario(ledger)
    await apply(service, ledger.records())
    rows = await revenue.period_rows(service.db, start_day="1970-01-01", end_day="9999-12-31")
    assert rows
    for row in rows:
        tenant, unit = row["tenant"], row["unit"]
        books = account_balances(p for e in ledger.app.events.get(ids.account_id(tenant))
                                 for p in getattr(e, "postings", None) or [])
        pool = POOL if is_currency_code(unit) else ("tenant_wallet",)
        assert (row["other"], row["revenue_other"], row["opening_deferred"]) == (0, 0, 0), (tenant, unit)
        assert row["closing_deferred"] == -sum(books.get((a, unit), 0) for a in pool), (tenant, unit)
        assert row["closing_deferred"] == revenue.deferred_change(row), (tenant, unit)
        assert row["recognised_revenue"] == -books.get(("recognised_revenue", unit), 0), (tenant, unit)
        assert row["breakage_revenue"] == -books.get(("breakage", unit), 0), (tenant, unit)
        assert row["promotional_expense"] == books.get(("promotional_expense", unit), 0), (tenant, unit)


async def test_the_finance_page_shows_the_months_revenue_as_the_api_reports_it(service: ProjectionService) -> None:
    ledger = Ledger()
    month_end_scenario(ledger, "close")
    month_end_scenario(ledger, "other", catalog=False)
    month_end_later(ledger)
    await apply(service, ledger.records())
    async with serving(service) as client:
        page = (await client.get("/dashboard/finance?year=2026&month=10", headers=auth("finance"))).text
        api = await report(client, period="2026-10")
        tenants = (await report(client, period="2026-10", by="tenant"))["items"]
        future = (await client.get("/dashboard/finance?year=9999&month=1", headers=auth("finance"))).text
    usd = line(api)
    for key, _, _ in REVENUE_ROWS:
        assert text_of(page, f"revenue-{key}-USD") == usd[key], key
    assert (text_of(page, "revenue-closing_deferred-USD"), text_of(page, "revenue-recognised_revenue-USD")) == (
        "200.00", "70.00")  # two tenants' October, to the sub-unit
    rows = re.findall(r'data-testid="revenue-tenant-row" data-tenant="([^"]*)" data-unit="([^"]*)"', page)
    assert rows == [(t["tenant"], t["unit"]) for t in tenants] == [("close", "USD"), ("other", "USD")]
    assert 'data-testid="revenue-empty"' in future and 'data-testid="revenue-table"' not in future
