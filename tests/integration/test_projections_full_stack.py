"""The read models fed by the whole real stack: usage in through Kafka, rated, posted by the ledger, relayed,
projected. What the query API shows must add up to what was sent."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_rating import ai_event
from tests.integration.test_walking_skeleton import apply_accounts, produce_raw, usage, wait_balance
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration


def test_usage_through_the_stack_shows_in_every_read_model(stack: Stack, tmp_path: Path) -> None:
    tenant = f"proj-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    events = [
        usage(tenant, "calls-1", "10"), usage(tenant, "calls-2", "5"),
        ai_event(tenant, "ai-1", "gpt-4o", "ann", 10_000, 2_000),       # 0.025 + 0.020
        ai_event(tenant, "ai-2", "gpt-4o-mini", "bob", 100_000, 50_000),  # 0.015 + 0.030
        ai_event(tenant, "ai-3", "gpt-4o", "bob", 4_000, 1_000),        # 0.010 + 0.010
    ]
    asyncio.run(produce_raw(stack, events))
    total = Decimal("3.00") + Decimal("0.110")
    wait_balance(stack, tenant, Decimal("100.00") - total)
    viewer = auth("viewer", tenant)
    now = datetime.now(UTC)

    def transactions() -> list[dict[str, object]]:
        r = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/transactions", headers=viewer,
                      params={"type": "usage"})
        items = r.json()["items"]
        return items if len(items) == 5 else []

    usage_rows = wait_until(transactions, what="five usage transactions")
    assert sorted(str(t["event_ids"][0]) for t in usage_rows) == ["ai-1", "ai-2", "ai-3", "calls-1", "calls-2"]
    assert {t["user"] for t in usage_rows if str(t["meter"]) == "ai_tokens"} == {"ann", "bob"}
    assert sum(Decimal(str(t["amount"])) for t in usage_rows) == -total

    monthly = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/usage/monthly", headers=viewer,
                        params={"year": now.year, "month": now.month}).json()["items"]
    by_meter = {m["meter"]: m for m in monthly}
    assert (by_meter["api_calls"]["quantity"], by_meter["api_calls"]["cost"]) == ("15", "3.00")
    assert (by_meter["ai_tokens"]["quantity"], by_meter["ai_tokens"]["cost"]) == ("167000", "0.11")
    assert by_meter["ai_tokens"]["usage_type"] == "ai"

    ai = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/usage/ai", headers=viewer).json()["items"]
    by_model = {a["model"]: a for a in ai}
    assert (by_model["gpt-4o"]["input_tokens"], by_model["gpt-4o"]["output_tokens"]) == ("14000", "3000")
    assert Decimal(by_model["gpt-4o"]["cost"]) == Decimal("0.065")
    assert Decimal(by_model["gpt-4o-mini"]["cost"]) == Decimal("0.045")
    by_user = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/usage/ai", headers=viewer,
                        params={"group_by": "user"}).json()["items"]
    assert {a["user"]: Decimal(a["cost"]) for a in by_user} == {"ann": Decimal("0.045"), "bob": Decimal("0.065")}

    figures = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/figures", headers=viewer,
                        params={"granularity": "month"}).json()["items"]
    assert sum(Decimal(f["consumed"]) for f in figures) == total
    assert sum(Decimal(f["promotional"]) for f in figures) == Decimal("100.00")
