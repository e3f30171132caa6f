"""Operator actions need platform staff (admin/finance without a tenant claim): a customer's own admin or finance
token (``tenant`` claim) is refused 403 problem+json and changes nothing; a platform token still does the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from billing_events import ids
from billing_ledger.application import LedgerApplication
from billing_ledger.checkout_http import build_router as build_checkout_router
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.http import build_router as build_ledger_router
from billing_ledger.subscriptions_http import build_router as build_subscriptions_router
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.payments.support import TENANT, headers, ledger

__all__ = ["ledger"]


def http(ledger: LedgerApplication, tmp_path: Path) -> TestClient:
    settings = Settings(data_dir=tmp_path)
    api = create_app("ledger-operators", settings)
    api.include_router(build_ledger_router(ledger))
    api.include_router(build_checkout_router(ledger, settings, {}))
    api.include_router(build_subscriptions_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    return TestClient(api)


def forbidden(response: Any) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_a_tenants_own_admin_cannot_raise_its_pool_capacity(ledger: LedgerApplication, tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    path = f"/v1/accounts/{TENANT}/pools/users"
    forbidden(client.put(path, headers=headers("admin", TENANT), json={"capacity": 100000}))
    assert ledger.read(ResourcePool.create_id(TENANT, "users"), lambda p: p.capacity) is None  # nothing set
    operator = client.put(path, headers=headers("admin", None), json={"capacity": 5})
    assert operator.status_code == 200, operator.text
    assert operator.json()["capacity"] == 5


def test_a_tenants_own_finance_token_cannot_refund_or_override(ledger: LedgerApplication, tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    body = {"idempotency_key": "r1", "grant_id": str(ids.account_id(TENANT)), "amount": "5.00", "reason": "mine",
            "finance_override": True}
    for role in ("admin", "finance"):
        forbidden(client.post(f"/v1/accounts/{TENANT}/refunds", headers=headers(role, TENANT), json=body))
    forbidden(client.post(f"/v1/accounts/{TENANT}/refunds", headers=headers("admin", None), json=body))  # finance only
    operator = client.post(f"/v1/accounts/{TENANT}/refunds", headers=headers("finance", None), json=body)
    assert operator.status_code != 403, operator.text  # the platform's finance gets past the check (no such grant)


def test_a_tenant_cannot_review_its_own_refund_requests(ledger: LedgerApplication, tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    for action in ("approve", "reject"):
        for role in ("admin", "finance"):
            forbidden(client.post(f"/v1/accounts/{TENANT}/refund-requests/rq/{action}", headers=headers(role, TENANT)))
        operator = client.post(f"/v1/accounts/{TENANT}/refund-requests/rq/{action}", headers=headers("finance", None))
        assert operator.status_code == 404, operator.text  # reviewed by the platform: no such request here


def test_a_tenant_cannot_point_its_account_at_another_gateway_customer(ledger: LedgerApplication,
                                                                     tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    path = f"/v1/accounts/{TENANT}/gateway-customers/stripe"
    forbidden(client.put(path, headers=headers("admin", TENANT), json={"customer": "cus_someone_else"}))
    operator = client.put(path, headers=headers("admin", None), json={"customer": "cus_1"})
    assert operator.status_code == 200, operator.text


def test_a_tenants_own_admin_cannot_run_everyones_billing_cycle(ledger: LedgerApplication, tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    forbidden(client.post("/v1/billing/cycle/run", headers=headers("admin", TENANT)))
    operator = client.post("/v1/billing/cycle/run", headers=headers("admin", None))
    assert operator.status_code == 200, operator.text


def test_the_customers_own_settings_stay_open_to_its_tokens(ledger: LedgerApplication, tmp_path: Path) -> None:
    client = http(ledger, tmp_path)
    for role in ("admin", "finance"):
        put = client.put(f"/v1/accounts/{TENANT}/low-balance", headers=headers(role, TENANT),
                         json={"threshold": "5.00"})
        assert put.status_code == 200, put.text
    asked = client.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer", TENANT),
                        json={"key": "rq", "order": "nope", "reason": "changed my mind"})
    assert asked.status_code != 403, asked.text
