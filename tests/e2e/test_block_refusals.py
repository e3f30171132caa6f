"""Usage the ledger refused under a ``block`` overage policy leaves rating's running total (found by review2,
session 13: it stayed, so the next event of the period was priced as if the refused one had been billed).

Stairstep meter (10 documents: 500 CREDIT, up to 100): the first 10 documents arrive with no CREDIT and are refused
(``insufficient_credit``, nothing posted); the customer then gets 1,000 CREDIT and sends 10 more documents. They are
the first documents of the period that are billed, so they cost 500 CREDIT; rating prices them as documents 11-20
(same step: increment 0) and the customer gets them for free. The same happens to a meter's ``included`` allowance
and to tiers: refused usage uses them up."""

from __future__ import annotations

import signal
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from tests.support import ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.e2e

CATALOG = {
    "catalog": {
        "credit_units": {"CREDIT": {"scale": 2}},
        "meters": [{"code": "evidence_documents", "name": "Evidence processing", "unit_of_measure": "document",
                    "usage_type": "evidence", "aggregation": "sum", "overage_policy": "block",
                    "price": {"model": "stairstep", "unit": "CREDIT",
                              "steps": [{"up_to": "100", "amount": "500"}, {"up_to": None, "amount": "2000"}]}}],
    },
    "accounts": [{"tenant": "acme", "currency": "USD"}],
}


def monthly(base: str) -> list[dict[str, object]]:
    r = httpx.get(f"{base}/v1/accounts/acme/usage/monthly", headers=auth("viewer", "acme"), timeout=5)
    r.raise_for_status()
    return [i for i in r.json()["items"] if i["meter"] == "evidence_documents"]


def monthly_events(base: str) -> int:
    return sum(int(str(i["events"])) for i in monthly(base))


def history(base: str) -> list[dict[str, object]]:
    r = httpx.get(f"{base}/v1/accounts/acme/transactions", headers=auth("viewer", "acme"), timeout=5)
    r.raise_for_status()
    return list(r.json()["items"])


def credit(base: str) -> Decimal:
    r = httpx.get(f"{base}/v1/accounts/acme/balance", headers=auth("viewer", "acme"), timeout=5)
    r.raise_for_status()
    return next((Decimal(w["available"]) for w in r.json()["wallets"] if w["unit"] == "CREDIT"), Decimal(0))


def test_usage_refused_under_block_does_not_make_the_next_usage_free(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(CATALOG))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"BILLING_DATA_DIR": str(tmp_path / "var"), "BILLING_PORT": str(port),
           "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}
    run = ServiceProcess(["run", "--catalog", str(catalog)], env, tmp_path / "run.log", port).start()
    try:
        wait_until(lambda: httpx.get(f"{base}/v1/accounts/acme/balance", headers=auth("viewer", "acme")).status_code
                   == 200, what="the account")
        now = datetime.now(UTC).isoformat()
        first = {"id": "doc-1", "tenant": "acme", "meter": "evidence_documents", "quantity": "10", "timestamp": now}
        r = httpx.post(f"{base}/v1/usage", json=first, headers=auth("service"))
        assert r.json()["results"][0]["status"] == "accepted", r.text
        wait_until(lambda: any(t["type"] == "usage_rejected" for t in history(base)), what="doc-1 refused")

        given = httpx.post(f"{base}/v1/accounts/acme/adjustments", headers=auth("admin"),
                           json={"idempotency_key": "topup", "amount": "1000", "unit": "CREDIT", "reason": "credit"})
        assert given.status_code == 201, given.text
        wait_until(lambda: credit(base) == Decimal("1000.00"), what="1000 CREDIT")

        second = dict(first, id="doc-2", timestamp=datetime.now(UTC).isoformat())
        r = httpx.post(f"{base}/v1/usage", json=second, headers=auth("service"))
        assert r.json()["results"][0]["status"] == "accepted", r.text
        wait_until(lambda: monthly_events(base) == 1, what="doc-2 rated and posted")
        # The only billed documents of the period are doc-2's 10: the first step, 500 CREDIT.
        assert credit(base) == Decimal("500.00")
        # The monthly summary agrees: 10 documents (the refused ones are not usage), 500 CREDIT.
        [month] = monthly(base)
        assert (Decimal(str(month["quantity"])), Decimal(str(month["cost"])), month["events"]) == (10, 500, 1)
    finally:
        run.stop(signal.SIGINT)
