"""Review (session 13) findings: ways past the identity-verification gate (seed 003): orders still open did not
count towards the threshold, auto-top-up never checked it, and a tenant's own token could verify itself or use the
correction routes on itself (operators only now: billing_runtime.auth.require_operator)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from billing_events import ids
from billing_ledger.application import LedgerApplication
from billing_ledger.topups import process_pending
from billing_runtime.settings import Settings

from tests.unit.payments.support import (
    TENANT,
    FakeStripe,
    client,
    command,
    headers,
    ledger,
    run,
    stripe_gateway,
)

__all__ = ["ledger"]
URLS = {"success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}


def checkout(http: Any, key: str, **body: Any) -> Any:
    return http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": key},
                     json={"gateway": "stripe", **URLS, **body})


def test_a_tenants_own_admin_token_cannot_lift_its_identity_gate(ledger: LedgerApplication) -> None:
    settings = Settings(identity_verification="first_top_up")
    http = client(ledger, {"stripe": stripe_gateway(FakeStripe())}, settings)
    assert checkout(http, "k1", amount="10").status_code == 403  # gated
    # The same customer's admin token (scoped to its tenant) says "I am verified" ...
    self_verified = http.post(f"/v1/accounts/{TENANT}/identity/verify",
                              headers={**headers("admin", TENANT), "Idempotency-Key": "self"},
                              json={"reference": "trust-me", "method": "manual"})
    assert self_verified.status_code == 403
    assert checkout(http, "k2", amount="10").status_code == 403  # ... and may still not pay unverified


def test_open_orders_count_towards_the_identity_threshold(ledger: LedgerApplication) -> None:
    settings = Settings(identity_verification="threshold", identity_threshold="50")
    http = client(ledger, {"stripe": stripe_gateway(FakeStripe())}, settings)
    accepted = [checkout(http, f"split-{i}", amount="20").status_code for i in range(4)]  # 4 x 23.80 = 95.20 > 50
    assert accepted.count(201) <= 2, accepted  # at most 47.60 may be opened unverified


def test_concurrent_checkouts_cannot_both_pass_the_threshold(ledger: LedgerApplication) -> None:
    gate = {"mode": "threshold", "threshold": "50"}

    def place(key: str) -> str:
        [placed] = ledger.apply_commands([command("checkout.place", TENANT, {
            "key": key, "amount": "20", "gateway": "stripe", "identity_gate": gate}, key)])
        return placed.outcome  # 23.80 each with tax: three together are 71.40

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(place, ["c1", "c2", "c3"]))
    assert outcomes.count("applied") == 2, outcomes
    # A failed order no longer counts: the next checkout passes again.
    first = next(k for k, o in zip(["c1", "c2", "c3"], outcomes, strict=True) if o == "applied")
    [failed] = ledger.apply_commands([command("checkout.fail", TENANT, {"key": first, "reason": "declined"}, "f")])
    assert failed.outcome == "applied"
    assert place("c4") == "applied"


@pytest.mark.asyncio
async def test_auto_top_up_respects_the_identity_gate(ledger: LedgerApplication,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_IDENTITY_VERIFICATION", "first_top_up")
    now = datetime.now(UTC)
    assert run(ledger, "credit.grant", TENANT, "g", unit="USD", amount="20", grant_key="start", source="manual",
               effective_at=(now - timedelta(days=1)).isoformat()).outcome == "applied"
    assert run(ledger, "auto_top_up.set", TENANT, "rule", threshold="10", target="50", cooldown_seconds=3600,
               monthly_cap="500").outcome == "applied"
    assert run(ledger, "payment_method.add", TENANT, "pm", method_id="pm_1", gateway="stripe",
               label="card").outcome == "applied"
    assert run(ledger, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"
    assert run(ledger, "usage.debit", TENANT, "u1", unit="USD", amount_subunits=15 * 10**9, meter="api_calls",
               at=now.isoformat(), cause={}).outcome == "applied"
    api = FakeStripe()
    await process_pending(ledger, {"stripe": stripe_gateway(api)}, None)
    # Nothing charged before the identity is verified (the checkout route refuses the same top-up with 403).
    assert [c for c in api.calls if c[1] == "/v1/payment_intents"] == []


def test_a_tenants_own_token_cannot_grant_itself_credit(ledger: LedgerApplication) -> None:
    from billing_ledger.http import build_router as build_ledger_router
    from billing_runtime.http import create_app
    from fastapi.testclient import TestClient

    settings = Settings()
    api = create_app("ledger-review3", settings)
    api.include_router(build_ledger_router(ledger))
    http = TestClient(api)
    for role in ("admin", "finance"):
        gift = http.post(f"/v1/accounts/{TENANT}/adjustments", headers=headers(role, TENANT),
                         json={"idempotency_key": f"gift-{role}", "amount": "1000.00", "reason": "to myself"})
        assert gift.status_code == 403, gift.text
    assert ledger.read(ids.account_id(TENANT), lambda a: a.balance("USD")) == 0
