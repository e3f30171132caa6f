"""Session 14 review, through the HTTP API of `billing run` (embedded, SQLite): what a tenant pays for usage of an
ended period that arrives after its renewal must not depend on the order in which it and the open period's usage
arrive. The late event was rated into the open period (late policy ``next_period``: the open period's running total,
allowance and tiers) while the ledger drew it by its own time, from the ended period's credit (used up), so it goes
to overage while the open period's included credit stayed unused; arriving first, it fell in the open period's
allowance and the open period's usage drew that credit instead (docs/rating.md "Late events and corrections",
docs/subscriptions.md "Recurring credits"). Since session 14 late usage is priced on its own period's total and
allowance, where the ledger draws it from, whatever arrived since."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from tests.e2e.test_period_credit_late_usage_e2e import Api
from tests.support import ServiceProcess, free_port, wait_until

pytestmark = pytest.mark.e2e

# The review's tenant A in small: 30.00 a month including 10.00 USD of credit and 100 calls, then 0.10 a call.
CATALOG = """\
catalog:
  meters:
    - {code: api_calls, aggregation: sum, price: {model: per_unit, unit: USD, unit_amount: "0.20"}}
  plans:
    - code: plus
      name: Plus
      cadence: month
      currency: USD
      base_fee: "30.00"
      charges:
        - {meter: api_calls, included: "100", price: {model: per_unit, unit: USD, unit_amount: "0.10"}}
      recurring_credits:
        - {unit: USD, amount: "10.00", cadence: month}
accounts:
  - {tenant: first-late, currency: USD}
  - {tenant: first-new, currency: USD}
"""


def charged_five(api: Api, tenant: str) -> bool:
    """Whether the ledger recorded the 5.00 usage debit (the events within the allowance cost 0 and show no row)."""
    return any(row["meter"] == "api_calls" and Decimal(row["amount"]) == Decimal("-5.00")
               for row in api.get(f"/v1/accounts/{tenant}/transactions?limit=50")["items"])


def test_late_usage_costs_the_same_whichever_order_it_and_the_open_periods_usage_arrive_in(tmp_path: Path) -> None:
    """Two tenants on Plus, periods that ended days ago, each with 300 calls in the ended period (20.00: its 10.00 of
    credit and 10.00 beyond it, on the renewal). After the renewal each sends the same two events: 100 calls now and
    50 calls of the ended period (late). ``first-new`` sends the open period's first: the late 50 are the 101st-150th
    calls of the open period, 5.00, drawn by their time from the ended period's credit (none left): 5.00 owed while
    the open period's 10.00 stays unused. ``first-late`` sends the late ones first: within the allowance (0.00), and
    the 100 calls now cost 5.00 of the open period's credit. Same usage, same times: the balances must agree (the
    review's tenant A: 2,000 late calls billed 15.00 beyond credit, its 30.00 of Pro credit for the period unused)."""
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    port = free_port()
    env = {"BILLING_DATA_DIR": str(tmp_path / "var"), "BILLING_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "",
           "DATABASE_URL": "", "BILLING_SCHEDULER_INTERVAL_SECONDS": "3600",
           "BILLING_PAYMENTS_INTERVAL_SECONDS": "3600"}
    run = ServiceProcess(["run", "--catalog", str(tmp_path / "catalog.yaml")], env, tmp_path / "run.log",
                         port).start()
    api = Api(f"http://127.0.0.1:{port}")
    now = datetime.now(UTC).replace(microsecond=0)
    tenants = ("first-late", "first-new")
    try:
        wait_until(lambda: api.get("/v1/catalog/plans"), what="the catalogue")
        ends = {}
        for tenant in tenants:
            started = api.post(f"/v1/accounts/{tenant}/subscriptions", {
                "key": "main", "plan": "plus", "trial": False, "at": (now - timedelta(days=34)).isoformat()})
            ends[tenant] = datetime.fromisoformat(started["period_end"])
            assert ends[tenant] < now - timedelta(days=1)
            api.usage(tenant, [("old", "api_calls", "300", now - timedelta(days=20))])
        for tenant in tenants:
            wait_until(lambda t=tenant: api.debited(t, "api_calls"), what=f"{tenant}'s period usage debited")
            api.tick(ends[tenant] + timedelta(seconds=1))
            wait_until(lambda t=tenant: api.renewal_lines(t), what=f"{tenant}'s renewal invoice")
        late_at = ends["first-late"] - timedelta(days=1)
        api.usage("first-late", [("late", "api_calls", "50", late_at)])
        time.sleep(2)  # rated and posted before the open period's usage
        api.usage("first-late", [("new", "api_calls", "100", now)])
        api.usage("first-new", [("new", "api_calls", "100", now)])
        time.sleep(2)
        api.usage("first-new", [("late", "api_calls", "50", late_at)])
        for tenant in tenants:
            wait_until(lambda t=tenant: charged_five(api, t), what=f"{tenant}'s 5.00 of usage")
        time.sleep(1)
        wallets = {tenant: api.get(f"/v1/accounts/{tenant}/balance")["wallets"][0] for tenant in tenants}
    finally:
        run.stop()
    seen = {tenant: (w["available"], w["receivable"]) for tenant, w in wallets.items()}
    assert seen["first-new"] == seen["first-late"], seen
