"""Rating on the real stack: AI tokens for two models through Kafka, catalogue routes, period close."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts, available, produce_raw, wait_balance
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration


def ai_event(tenant: str, event_id: str, model: str, user: str, input_tokens: int, output_tokens: int
             ) -> dict[str, object]:
    return {"id": event_id, "tenant": tenant, "meter": "ai_tokens", "quantity": str(input_tokens + output_tokens),
            "timestamp": datetime.now(UTC).isoformat(),
            "properties": {"model": model, "operation": "chat", "user": user,
                           "input_tokens": input_tokens, "output_tokens": output_tokens}}


def test_ai_tokens_for_two_models_are_priced_per_model(stack: Stack, tmp_path: Path) -> None:
    tenant = f"ai-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    events = [
        ai_event(tenant, "ai-1", "gpt-4o", "ann", 10_000, 2_000),      # 0.025 + 0.020 = 0.045
        ai_event(tenant, "ai-2", "gpt-4o-mini", "bob", 100_000, 50_000),  # 0.015 + 0.030 = 0.045
        ai_event(tenant, "ai-3", "gpt-4o", "bob", 4_000, 1_000),       # 0.010 + 0.010 = 0.020
    ]
    asyncio.run(produce_raw(stack, events))
    wait_balance(stack, tenant, Decimal("100.00") - Decimal("0.110"))

    lines = wait_until(lambda: _decisions(stack, tenant), what="rating decisions")
    by_model: dict[str, Decimal] = {}
    for decision in lines:
        by_model[decision["model"]] = by_model.get(decision["model"], Decimal(0)) + Decimal(decision["amount"])
    assert by_model == {"gpt-4o": Decimal("0.065"), "gpt-4o-mini": Decimal("0.045")}


def _decisions(stack: Stack, tenant: str) -> list[dict[str, str]]:
    period = datetime.now(UTC).strftime("%Y-%m")
    r = httpx.get(f"{stack.rating_url}/v1/rating/periods/{period}/accounts/{tenant}/decisions",
                  headers=auth("viewer", tenant))
    r.raise_for_status()
    decisions = r.json()["decisions"]
    return decisions if len(decisions) == 3 else []


def test_catalogue_routes_show_packages_and_refuse_bad_catalogues(stack: Stack, tmp_path: Path) -> None:
    apply_accounts(stack, tmp_path, [f"cat-{uuid.uuid4().hex[:6]}"])
    packages = wait_until(lambda: httpx.get(f"{stack.rating_url}/v1/catalog/packages",
                                            headers=auth("viewer", "x")).json().get("packages"),
                          what="packages")
    bonus = next(p for p in packages if p["code"] == "credits-100")
    assert (bonus["effective_credits"], bonus["cost_per_credit"]) == ("110.00", "0.909091")
    bad = httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("admin"),
                     json={"meters": [{"code": "x", "price": {"model": "per_unit", "unit": "USD",
                                                              "unit_amount": "-1"}}]})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
    assert "negative" in bad.json()["detail"]
    forbidden = httpx.post(f"{stack.rating_url}/v1/catalog", headers=auth("viewer", "x"), json={})
    assert forbidden.status_code == 403


def test_balance_unchanged_by_unpriced_model(stack: Stack, tmp_path: Path) -> None:
    tenant = f"aix-{uuid.uuid4().hex[:8]}"
    apply_accounts(stack, tmp_path, [tenant])
    wait_balance(stack, tenant, Decimal("100.00"))
    asyncio.run(produce_raw(stack, [ai_event(tenant, "u-1", "unknown-model", "ann", 10, 10),
                                    {"id": "m-1", "tenant": tenant, "meter": "api_calls", "quantity": "1",
                                     "timestamp": datetime.now(UTC).isoformat()}]))
    wait_balance(stack, tenant, Decimal("99.80"))
    assert available(stack, tenant) == Decimal("99.80")
