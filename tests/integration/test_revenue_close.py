"""A month-end close on real Kafka + PostgreSQL: the ledger's own events for October 2026 (a subscription fee billed
in advance and recognised, credit bought, a promotion, usage, the promotion's breakage) published to Kafka and read
by a `billing serve projections` process (with the run at the period's end that recognises the fee's last day, dated
Oct 31); October's revenue report reads the same after November's events (a renewal billed, a refund, more usage) and after `billing projections rebuild` of the live
store, and November opens where October closed."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.integration.projections_support import (
    ProjectionsStack,
    dump_schema,
    publish,
    start_projections,
    wait_caught_up,
)
from tests.support import BILLING, ROOT, auth
from tests.unit.projections.ledger_events import Ledger, month_end_later, month_end_scenario

pytestmark = pytest.mark.integration
TENANTS = ("close-a", "close-b")


@pytest.fixture(scope="module")
def stack(infra: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProjectionsStack]:
    started = start_projections(infra, tmp_path_factory.mktemp("revenue-close"))
    try:
        yield started
    finally:
        started.process.stop()


def _report(stack: ProjectionsStack, **params: str) -> dict[str, Any]:
    r = httpx.get(f"{stack.url}/v1/reports/revenue", params=params, headers=auth("finance"), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _usd(body: dict[str, Any], tenant: str | None = None) -> dict[str, Any]:
    [found] = [i for i in body["items"] if i["unit"] == "USD" and i.get("tenant") == tenant]
    return found


def test_octobers_close_stays_put_through_novembers_events_and_a_rebuild(stack: ProjectionsStack) -> None:
    ledger = Ledger()
    for tenant in TENANTS:
        month_end_scenario(ledger, tenant, catalog=tenant == TENANTS[0])
    asyncio.run(publish(stack, ledger.messages()))
    wait_caught_up(stack)
    october = {"period": "2026-10"}
    closed, closed_by_tenant = _report(stack, **october), _report(stack, **october, by="tenant")
    usd = _usd(closed)
    # Two tenants' October, each: 100.00 sold, 10.00 promoted, 31.00 billed; 4.00 used, 6.00 lapsed, the fee
    # recognised to its last day (Oct 31's share recorded by the run of Nov 1, dated Oct 31).
    assert (usd["credit_sold"], usd["promotional"], usd["fees_billed"], usd["recognised_usage"], usd["breakage"],
            usd["recognised_fees"], usd["closing_deferred"], usd["recognised_revenue"]) == (
        "200.00", "20.00", "62.00", "8.00", "12.00", "62.00", "200.00", "70.00")
    assert [i["tenant"] for i in closed_by_tenant["items"]] == list(TENANTS)
    # `billing reports revenue` reads the same figures from the PostgreSQL schema (no service, no token).
    for options, expected in (([], closed), (["--by", "tenant"], closed_by_tenant)):
        shown = subprocess.run([BILLING, "reports", "revenue", "--period", "2026-10", *options, "--format", "json"],
                               env=stack.process.env, cwd=ROOT, capture_output=True, text=True, timeout=60,
                               check=False)
        assert shown.returncode == 0, shown.stderr[-2000:]
        assert json.loads(shown.stdout) == expected

    for tenant in TENANTS:
        month_end_later(ledger, tenant)
    asyncio.run(publish(stack, ledger.messages()))
    wait_caught_up(stack)
    assert _report(stack, **october) == closed
    assert _report(stack, **october, by="tenant") == closed_by_tenant
    november = _usd(_report(stack, period="2026-11"))
    assert november["opening_deferred"] == usd["closing_deferred"]
    assert (november["fees_billed"], november["refunds"], november["recognised_usage"], november["closing_deferred"]) == (
        "62.00", "20.00", "4.00", "238.00")
    # The closing balance is the chart of accounts' deferred revenue: tenant wallets and fees billed in advance.
    chart = httpx.get(f"{stack.url}/v1/reports/ledger", headers=auth("finance"), timeout=10).json()["items"]
    liability = sum(Decimal(r["balance"]) for r in chart
                    if r["unit"] == "USD" and r["ledger_account"] in ("tenant_wallet", "deferred_revenue"))
    assert -liability == Decimal(november["closing_deferred"])

    live = asyncio.run(dump_schema(stack.database_url, stack.schema))["revenue_daily"]
    stack.process.stop()
    done = subprocess.run([BILLING, "projections", "rebuild"], env=stack.process.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert asyncio.run(dump_schema(stack.database_url, stack.schema))["revenue_daily"] == live
    stack.restart()
    wait_caught_up(stack)
    assert _report(stack, **october) == closed
    assert _report(stack, **october, by="tenant") == closed_by_tenant
