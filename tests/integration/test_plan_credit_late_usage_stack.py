"""A rollover plan credit pays its period's usage that reaches the ledger after the renewal, on the real stack:
usage through Kafka (raw -> ingest -> rating -> ledger), the subscription and the cycle through the ledger's HTTP API,
balances from the projections (docs/subscriptions.md "Recurring credits"; session 14). Before, the renewal voided the
ended period's credit (2.00 carried, the rest lapsed at once) and that usage was owed as overage."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import produce_raw
from tests.support import BILLING, ROOT, auth, wait_until

pytestmark = pytest.mark.integration

# 30.00 a month including 10.00 USD of credit that rolls over (at most 2.00); calls at 0.10 each.
PLAN = {"code": "team-rollover", "name": "Team (rollover)", "cadence": "month", "currency": "USD", "base_fee": "30.00",
        "charges": [{"meter": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}}],
        "recurring_credits": [{"unit": "USD", "amount": "10.00", "cadence": "month", "rollover": True,
                               "rollover_cap": "2.00"}]}


def _apply(stack: Stack, tmp_path: Path, tenant: str) -> None:
    """The demo catalogue with the rollover plan, and ``tenant`` (no credit of its own), through `billing catalog
    apply`."""
    document = yaml.safe_load((ROOT / "examples/demo-catalog.yaml").read_text())
    document["catalog"]["plans"].append(PLAN)
    document["accounts"] = [{"tenant": tenant, "currency": "USD"}]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(document))
    subprocess.run([BILLING, "catalog", "apply", str(path)], env={**stack.processes["ingest"].env}, check=True,
                   cwd=ROOT, capture_output=True)


def _wallet(stack: Stack, tenant: str) -> dict[str, Any] | None:
    response = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/balance", headers=auth("viewer", tenant),
                         timeout=10)
    if response.status_code != 200:
        return None
    return next((w for w in response.json()["wallets"] if w["unit"] == "USD"), None)


def _shows(stack: Stack, tenant: str, **expected: str) -> bool:
    """Whether the USD wallet shows ``expected``; else an AssertionError naming what it shows (``wait_until`` keeps
    the last one for its message)."""
    wallet = _wallet(stack, tenant)
    shown = None if wallet is None else {name: wallet[name] for name in expected}
    assert shown == expected, f"the wallet shows {shown}"
    return True


def test_a_rollover_credit_pays_its_periods_usage_that_arrives_after_the_renewal(stack: Stack, tmp_path: Path
                                                                                ) -> None:
    tenant = f"roll-{uuid.uuid4().hex[:8]}"
    _apply(stack, tmp_path, tenant)
    ledger, admin = stack.ledger_url, auth("admin")
    wait_until(lambda: _wallet(stack, tenant) is not None, timeout=60, what=f"{tenant}'s account")
    # A month that began 33 days ago (as far back as a start may be dated) and has ended: 10.00 of credit.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=33)
    created = httpx.post(f"{ledger}/v1/accounts/{tenant}/subscriptions", headers=admin, timeout=30,
                         json={"key": "main", "plan": "team-rollover", "trial": False, "at": start.isoformat()})
    assert created.status_code == 201, created.text
    subscription = f"{ledger}/v1/accounts/{tenant}/subscriptions/main"
    end = datetime.fromisoformat(httpx.get(subscription, headers=admin, timeout=10).json()["period_end"])
    assert end < datetime.now(UTC)
    # The renewal first: 2.00 of the 10.00 carried into the next period's 12.00 (the 8.00 above the cap kept for the
    # ended period's late usage, set aside: not available; before, it lapsed at once).
    ticked = httpx.post(f"{ledger}/v1/billing/cycle/run", params={"at": (end + timedelta(seconds=1)).isoformat()},
                        headers=admin, timeout=30)
    assert ticked.status_code == 200, ticked.text
    wait_until(lambda: _shows(stack, tenant, available="12.00"), timeout=60, what="the renewal in the projections")
    # Then the ended period's usage, sent late: 40 and 30 calls (4.00 + 3.00) of its days.
    asyncio.run(produce_raw(stack, [
        {"id": f"{tenant}-1", "tenant": tenant, "meter": "api_calls", "quantity": "40",
         "timestamp": (start + timedelta(days=10)).isoformat()},
        {"id": f"{tenant}-2", "tenant": tenant, "meter": "api_calls", "quantity": "30",
         "timestamp": (start + timedelta(days=20)).isoformat()}]))
    # Paid by the ended period's credit kept for it: 1.00 left of it, the next period's 12.00 untouched, nothing
    # owed beyond the two fees (before: nothing kept, the 7.00 owed as overage: 67.00 receivable).
    wait_until(lambda: _shows(stack, tenant, available="12.00", late_usage_reserve="1.00", balance="13.00",
                              receivable="60.00"), timeout=90, what="the late usage drawn from the kept credit")
    # `billing audit verify`: the replay, the hash chain and the projection's balances agree.
    audit = subprocess.run([BILLING, "audit", "verify", "--tenant", tenant, "--projections-url", stack.projections_url,
                            "--wait-seconds", "10"], check=False, env={**stack.processes["ledger"].env},
                           cwd=ROOT, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
