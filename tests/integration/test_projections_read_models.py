"""Every read model on real Kafka + PostgreSQL: the ledger's own events, published to Kafka, read by a
`billing serve projections` process; then `billing projections rebuild` into a second schema gives the
same tables, row for row (subscription_changes, what churn and NRR are computed from, included)."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from billing_events.money import SUBUNITS_PER_UNIT

from tests.integration.projections_support import (
    ProjectionsStack,
    dump_schema,
    publish,
    start_projections,
    wait_caught_up,
)
from tests.support import BILLING, ROOT, auth, drop_schema, wait_until
from tests.unit.projections.ledger_events import Ledger, analytics_scenario, full_scenario, simple_account

pytestmark = pytest.mark.integration
TENANTS = 20
DEBITS = 60


@pytest.fixture(scope="module")
def fed(infra: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProjectionsStack,
                                                                                            Ledger]]:
    stack = start_projections(infra, tmp_path_factory.mktemp("projections"))
    try:
        ledger = Ledger()
        analytics_scenario(ledger, prefix="sub-")  # its catalogue first: full_scenario publishes the demo one after
        full_scenario(ledger, "acme")
        for i in range(TENANTS):
            simple_account(ledger, f"org-{i:02d}", debits=DEBITS)
        messages = ledger.messages()
        asyncio.run(publish(stack, messages))
        asyncio.run(publish(stack, messages[-40:]))  # the relay re-published a tail after a crash
        wait_caught_up(stack)
        yield stack, ledger
    finally:
        stack.process.stop()


def _get(stack: ProjectionsStack, path: str, **kwargs: object) -> httpx.Response:
    return httpx.get(f"{stack.url}{path}", timeout=10, **kwargs)  # type: ignore[arg-type]


def test_balances_per_wallet_and_grant_equal_the_ledger(fed: tuple[ProjectionsStack, Ledger]) -> None:
    stack, ledger = fed
    for tenant, account in ledger.accounts.items():
        def balances_equal(tenant: str = tenant, account: Any = account) -> bool:
            body = _get(stack, f"/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant)).json()
            for wallet in body["wallets"]:
                unit = wallet["unit"]
                assert Decimal(wallet["balance"]) * SUBUNITS_PER_UNIT == account.balance(unit), (tenant, unit)
                assert Decimal(wallet["held"]) * SUBUNITS_PER_UNIT == account.held(unit), (tenant, unit)
                assert Decimal(wallet["receivable"]) * SUBUNITS_PER_UNIT == account.receivable(unit), (tenant, unit)
            return True

        # The API serves balances from its copy, refreshed by the consumer's notifications a moment after each
        # commit (balance_cache.py): the positions read by wait_caught_up may be ahead of it by that moment.
        wait_until(balances_equal, timeout=10, interval=0.05, what=f"{tenant}'s balances")
        grants = _get(stack, f"/v1/accounts/{tenant}/grants", headers=auth("viewer", tenant)).json()["items"]
        remaining = {g["grant_id"]: Decimal(g["remaining"]) * SUBUNITS_PER_UNIT for g in grants}
        assert remaining == {g["grant_id"]: g["remaining"] for g in account.grant_balances()}
    other = _get(stack, "/v1/accounts/acme/balance", headers=auth("viewer", "org-01"))
    assert other.status_code == 403 and other.headers["content-type"].startswith("application/problem+json")


def test_transaction_history_once_per_movement_with_cursor(fed: tuple[ProjectionsStack, Ledger]) -> None:
    stack, _ = fed
    seen: list[int] = []
    cursor = None
    while True:
        params: dict[str, str | int] = {"limit": 25} | ({"cursor": cursor} if cursor else {})
        page = _get(stack, "/v1/accounts/org-03/transactions", params=params, headers=auth("viewer", "org-03")).json()
        seen += [t["position"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == DEBITS + 1 == len(set(seen))  # the re-relayed tail was not applied twice
    usage = _get(stack, "/v1/accounts/org-03/transactions", headers=auth("admin"),
                 params={"type": "usage", "user": "user-2", "limit": 500}).json()["items"]
    assert len(usage) == DEBITS // 3 and all(t["event_ids"] and t["amount"] == "-0.20" for t in usage)
    exported = _get(stack, "/v1/reports/transactions", params={"tenant": "acme", "format": "csv"},
                    headers=auth("finance")).text
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert {r["type"] for r in rows} >= {"purchase", "usage", "refund", "expiry", "hold_captured", "adjustment"}


def test_monthly_usage_ai_usage_and_figures(fed: tuple[ProjectionsStack, Ledger]) -> None:
    stack, _ = fed
    monthly = _get(stack, "/v1/reports/usage/monthly", params={"year": 2026, "month": 10, "meter": "api_calls",
                                                              "limit": 500}, headers=auth("finance")).json()
    per_tenant = {r["tenant"]: r for r in monthly["items"] if r["unit"] == "USD"}
    assert per_tenant["org-07"]["quantity"] == str(DEBITS) and per_tenant["org-07"]["cost"] == "12.00"
    assert per_tenant["acme"]["quantity"] == "23"
    ai = _get(stack, "/v1/accounts/acme/usage/ai", params={"year": 2026, "month": 11},
              headers=auth("viewer", "acme")).json()["items"]
    assert {a["model"]: a["tokens"] for a in ai} == {"gpt-large": "1200", "gpt-small": "300"}
    figures = _get(stack, "/v1/reports/figures", params={"year": 2026, "month": 10},
                   headers=auth("finance")).json()["items"]
    usd = next(f for f in figures if f["unit"] == "USD")
    assert usd["top_ups"] == "100.00" and usd["tax_collected"] == "20.00"
    assert Decimal(usd["consumed"]) == Decimal("4.60") + TENANTS * DEBITS * Decimal("0.20")
    chargeback = _get(stack, "/v1/reports/chargeback", params={"year": 2026, "month": 10},
                      headers=auth("finance")).json()["items"]
    assert sum(Decimal(c["share_percent"]) for c in chargeback if c["unit"] == "USD") == pytest.approx(100, abs=0.2)


def test_subscription_analytics_through_the_consumer(fed: tuple[ProjectionsStack, Ledger]) -> None:
    stack, _ = fed
    body = _get(stack, "/v1/reports/subscriptions/analytics", params={"from": "2026-08", "to": "2026-10"},
                headers=auth("finance")).json()
    found = {(r["month"], r["currency"]): r for r in body["items"]}
    assert sorted(found) == [(m, c) for m in body["months"] for c in ("EUR", "USD")]
    sep, oct_ = found[("2026-09", "USD")], found[("2026-10", "USD")]
    assert (sep["accounts_start"], sep["accounts_new"], sep["accounts_churned"], sep["mrr_start"], sep["mrr_new"],
            sep["mrr_expansion"], sep["mrr_contraction"], sep["mrr_churned"], sep["mrr_end"]) == (
        8, 2, 2, "310.00", "30.00", "50.00", "60.00", "130.00", "200.00")
    assert (sep["logo_churn_rate"], sep["revenue_churn_rate"], sep["net_revenue_retention"]) == (
        "0.2500", "0.6129", "0.5484")
    assert (oct_["mrr_new"], oct_["mrr_churned"], oct_["mrr_end"], oct_["net_revenue_retention"]) == (
        "100.00", "10.00", "290.00", "0.9500")
    assert found[("2026-09", "EUR")]["net_revenue_retention"] == "2.0000"
    exported = _get(stack, "/v1/reports/subscriptions/analytics", headers=auth("finance"),
                    params={"from": "2026-09", "to": "2026-09", "tenant": "sub-nap", "format": "csv"}).text
    assert [(r["month"], r["mrr_churned"], r["accounts_churned"]) for r in csv.DictReader(io.StringIO(exported))] == [
        ("2026-09", "100.00", "1")]
    # The month under way ends at MRR now.
    mrr = {m["currency"]: m["mrr"] for m in _get(stack, "/v1/reports/mrr", headers=auth("finance")).json()["items"]}
    current = _get(stack, "/v1/reports/subscriptions/analytics", headers=auth("finance")).json()
    assert {r["currency"]: r["mrr_end"] for r in current["items"] if r["month"] == current["months"][-1]} == mrr


def test_rebuild_into_a_second_schema_equals_the_live_tables(fed: tuple[ProjectionsStack, Ledger]) -> None:
    stack, _ = fed
    target = f"{stack.namespace}_rebuilt"
    help_text = subprocess.run([BILLING, "projections", "--help"], capture_output=True, text=True, cwd=ROOT, check=False)
    command = ([BILLING, "projections"] if help_text.returncode == 0
               else [sys.executable, "-m", "billing_cli.projections"])  # until cli/main.py registers it
    try:
        done = subprocess.run([*command, "rebuild", "--schema", target], env=stack.process.env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        live = asyncio.run(dump_schema(stack.database_url, stack.schema))
        rebuilt = asyncio.run(dump_schema(stack.database_url, target))
        assert sum(len(rows) for rows in live.values()) > 1000
        assert len(live["subscription_changes"]) == 26  # analytics_scenario's 13 starts and 13 changes
        for table, rows in live.items():
            assert rebuilt[table] == rows, table
    finally:
        asyncio.run(drop_schema(stack.database_url, target))


