"""The reviewer's two scenarios through the HTTP API of `billing run` (embedded, SQLite): a plan's recurring credit
pays the usage of its own period that reaches the ledger after the period's end, the renewal's tick or the expiry
sweep (every 5 s): the close debit of a meter priced at close (seats, the last reading), which rating sends only
after the renewal, and usage sent after the period ended (docs/subscriptions.md "Recurring credits")."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.e2e

# The reviewer's hybrid plan (/tmp/rv/catalog.yaml): 50.00 a month including 10.00 USD of credit.
CATALOG = """\
catalog:
  meters:
    - {code: api_calls, aggregation: sum, price: {model: per_unit, unit: USD, unit_amount: "0.20"}}
    - {code: seats, aggregation: last, price: {model: per_unit, unit: USD, unit_amount: "5.00"}}
  plans:
    - code: hybrid
      name: Hybrid
      cadence: month
      currency: USD
      base_fee: "50.00"
      charges:
        - {meter: api_calls, included: "100", price: {model: graduated, unit: USD, tiers: [{up_to: "1000", unit_amount: "0.10"}, {up_to: null, unit_amount: "0.05"}]}}
        - {meter: seats, price: {model: per_unit, unit: USD, unit_amount: "3.00"}}
      recurring_credits:
        - {unit: USD, amount: "10.00", cadence: month}
accounts:
  - {tenant: t1, currency: USD}
  - {tenant: t13, currency: USD}
"""
# The expiry sweep runs every 5 s (billing_ledger.limits.SWEEP_INTERVAL_SECONDS): two rounds and a margin.
SWEEP_ROUNDS_SECONDS = 11


class Api:
    def __init__(self, base: str) -> None:
        self.base, self.admin = base, auth("admin")

    def post(self, path: str, body: Any = None, **params: str) -> Any:
        response = httpx.post(f"{self.base}{path}", json=body, params=params, headers=self.admin, timeout=30)
        assert response.status_code < 300, response.text
        return response.json()

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.base}{path}", headers=self.admin, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def usage(self, tenant: str, events: list[tuple[str, str, str, datetime]]) -> None:
        body = [{"id": f"{tenant}-{n}", "tenant": tenant, "meter": meter, "quantity": quantity,
                 "timestamp": at.isoformat()} for n, meter, quantity, at in events]
        response = httpx.post(f"{self.base}/v1/usage", json=body, headers=auth("service"), timeout=30)
        assert [r["status"] for r in response.json()["results"]] == ["accepted"] * len(body), response.text

    def renewal_lines(self, tenant: str) -> list[tuple[str, str]] | None:
        """The finalized renewal invoice's lines (kind, amount), once rating's usage lines finalized it."""
        for item in self.get(f"/v1/accounts/{tenant}/invoices")["items"]:
            if item["status"] == "finalized" and item["lines"] > 1:
                detail = self.get(f"/v1/accounts/{tenant}/invoices/{item['invoice_id']}")
                return [(line["kind"], line["amount"]) for line in detail["items"]]
        return None

    def debited(self, tenant: str, meter: str) -> bool:
        """Whether the ledger recorded a usage debit of ``meter`` (the projections' transaction history)."""
        return any(row["meter"] == meter for row in self.get(f"/v1/accounts/{tenant}/transactions?limit=50")["items"])

    def tick(self, at: datetime) -> None:
        self.post("/v1/billing/cycle/run", at=at.isoformat())


def test_the_periods_credit_pays_usage_that_reaches_the_ledger_after_the_period_end_or_the_renewal(
        tmp_path: Path) -> None:
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    port = free_port()
    env = {"BILLING_DATA_DIR": str(tmp_path / "var"), "BILLING_PORT": str(port), "KAFKA_BOOTSTRAP_SERVERS": "",
           "DATABASE_URL": "", "BILLING_SCHEDULER_INTERVAL_SECONDS": "3600",
           "BILLING_PAYMENTS_INTERVAL_SECONDS": "3600"}
    run = ServiceProcess(["run", "--catalog", str(tmp_path / "catalog.yaml")], env, tmp_path / "run.log",
                         port).start()
    api = Api(f"http://127.0.0.1:{port}")
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        wait_until(lambda: api.get("/v1/catalog/plans"), what="the catalogue")
        # t1 and t13 (Europe/Berlin): periods that ended a few days ago, ticked only now (a subscription's start is at
        # most 35 days back, and the cycle is never run ahead of now).
        t1 = api.post("/v1/accounts/t1/subscriptions", {"key": "main", "plan": "hybrid", "trial": False,
                                                          "at": (now - timedelta(days=34)).isoformat()})
        t13 = api.post("/v1/accounts/t13/subscriptions", {"key": "main", "plan": "hybrid", "trial": False,
                                                            "time_zone": "Europe/Berlin",
                                                            "at": (now - timedelta(days=33)).isoformat()})
        t1_end, t13_end = (datetime.fromisoformat(s["period_end"]) for s in (t1, t13))
        assert t1_end < now - timedelta(days=1) and t13_end < now - timedelta(days=1)
        time.sleep(SWEEP_ROUNDS_SECONDS)  # the sweeper's rounds after t1's period ended: they expired its credit
        # t1 sends its cycle's usage after the period's end, before the tick: 220 calls (12.00) and 3 seats (9.00).
        used = now - timedelta(days=20)
        api.usage("t1", [("1", "api_calls", "220", used), ("2", "seats", "3", used)])
        # t13: 150 calls (5.00 of the 10.00 of credit drawn) and seats reading 3, priced at 3.00 at close.
        api.usage("t13", [("1", "api_calls", "150", now - timedelta(days=4)),
                          ("2", "seats", "3", now - timedelta(days=4))])
        for tenant in ("t1", "t13"):  # rated and debited before the tick (so on the renewal's usage lines)
            wait_until(lambda t=tenant: api.debited(t, "api_calls"), what=f"{tenant}'s calls debited")
        time.sleep(2)  # the seats' readings came in the same request: rated with the calls
        # the 5.00 left: set aside for the ended period's late usage (in the balance, not available to new usage)
        assert Decimal(api.get("/v1/accounts/t13/balance")["wallets"][0]["balance"]) == Decimal("5.00")
        api.tick(t1_end + timedelta(seconds=1))
        api.tick(t13_end + timedelta(seconds=1))  # the renewal, then rating's close debit of the seats
        t1_lines = wait_until(lambda: api.renewal_lines("t1"), what="t1's renewal invoice")
        t13_lines = wait_until(lambda: api.renewal_lines("t13"), what="t13's renewal invoice")
    finally:
        run.stop()
    # t1: the 10.00 of credit paid in the fee pays 10.00 of the usage: 50.00 + 21.00 - 10.00 = 61.00. Before, the sweep
    # had expired it to breakage before the usage arrived, and the renewal billed 71.00.
    # t13: the close debit of the seats (9.00) draws the 5.00 left: 4.00 billed beyond credit, 54.00. Before, the
    # renewal expired the 5.00 to breakage first and the seats were billed in full: 59.00.
    assert {"t1": sorted(t1_lines), "t13": sorted(t13_lines)} == {
        "t1": sorted([("base_fee", "50.00"), ("usage", "12.00"), ("usage", "9.00"), ("credits_applied", "-10.00")]),
        "t13": sorted([("base_fee", "50.00"), ("usage", "5.00"), ("usage", "9.00"), ("credits_applied", "-10.00")])}
