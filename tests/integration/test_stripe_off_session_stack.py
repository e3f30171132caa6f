"""Stripe off-session charges through the real services: ``billing serve ingest`` and ``billing serve ledger`` (Kafka,
PostgreSQL, a fresh namespace) pointed at a local fake of Stripe's API by ``BILLING_STRIPE_API_BASE``.

A wallet crossing its auto-top-up threshold makes the ledger's auto-top-up task place an order and charge the saved
card off-session (``POST /v1/payment_intents``, ``confirm`` + ``off_session``); Stripe answers ``processing``, so the
order waits, and the credit arrives through the webhook path: ``payment_intent.succeeded`` signed with the webhook
secret, ingest re-fetches the intent from the same fake API and publishes the payment, the ledger pays the order.
"""

from __future__ import annotations

import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication, persistence_env

from tests.fake_http_api import Request, serve
from tests.integration.conftest import Stack
from tests.integration.test_walking_skeleton import apply_accounts
from tests.namespaces import scratch_namespace
from tests.support import ServiceProcess, auth, free_port, wait_until

pytestmark = pytest.mark.integration
WEBHOOK_SECRET = "whsec_off_session_stack"


class StripeApi:
    """Stripe's payment intents (offline): created ``processing``, then ``succeeded`` once ``settle`` is called."""

    def __init__(self) -> None:
        self.intents: dict[str, dict[str, Any]] = {}

    def __call__(self, request: Request) -> tuple[int, Any]:
        if request.method == "POST" and request.path == "/v1/payment_intents":
            form = {key: values[0] for key, values in request.form.items()}
            intent_id = f"pi_{len(self.intents) + 1}"
            self.intents[intent_id] = {
                "id": intent_id, "object": "payment_intent", "status": "processing", "amount": int(form["amount"]),
                "amount_received": 0, "currency": form["currency"], "payment_method": form["payment_method"],
                "customer": form.get("customer"), "confirm": form.get("confirm"),
                "off_session": form.get("off_session"),
                "metadata": {key[len("metadata["):-1]: value for key, value in form.items()
                             if key.startswith("metadata[")}}
            return 200, self.intents[intent_id]
        if request.method == "GET" and request.path.startswith("/v1/payment_intents/"):
            found = self.intents.get(request.path.rsplit("/", 1)[1])
            return (200, found) if found else (404, {"error": {"type": "invalid_request_error",
                                                              "message": "No such payment_intent"}})
        if request.method == "GET" and request.path.startswith("/v1/payment_methods/"):
            # saving a method asks Stripe what it is (its card's brand, last four digits and expiry)
            return 200, {"id": request.path.rsplit("/", 1)[1], "object": "payment_method", "type": "card",
                         "customer": None, "card": {"brand": "visa", "last4": "4242", "exp_month": 12,
                                                    "exp_year": 2099}}
        return 404, {"error": {"type": "invalid_request_error", "message": f"unknown {request.path}"}}

    def settle(self, intent_id: str) -> dict[str, Any]:
        intent = self.intents[intent_id]
        intent.update(status="succeeded", amount_received=intent["amount"])
        return intent


def available(env: dict[str, str], log_dir: Path, tenant: str) -> Decimal | None:
    store = LedgerApplication(persistence_env(env["DATABASE_URL"], str(log_dir),
                                              f"{env['BILLING_NAMESPACE']}_billing_ledger"))
    try:
        found = store.read(ids.account_id(tenant), lambda a: a.available("USD"))
    finally:
        store.close()
    return None if found is None else Decimal(found) / SUBUNITS_PER_UNIT


def test_auto_top_up_charges_off_session_through_the_fake_stripe_and_credits_through_the_webhook(
        infra: dict[str, str], tmp_path: Path) -> None:
    tenant = f"autotop-{uuid.uuid4().hex[:6]}"
    api = StripeApi()
    with serve(api) as fake:
        env = {**infra, "BILLING_NAMESPACE": scratch_namespace("t"), "BILLING_DATA_DIR": str(tmp_path / "var"),
               "BILLING_STRIPE_API_KEY": "sk_test_off_session", "BILLING_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
               "BILLING_STRIPE_API_BASE": fake.base, "BILLING_PAYMENTS_INTERVAL_SECONDS": "0.5"}
        ports = {"ingest": free_port(), "ledger": free_port()}
        processes = {name: ServiceProcess(["serve", name, "--port", str(port)], env, tmp_path / f"{name}.log", port)
                     for name, port in ports.items()}
        try:
            for process in processes.values():
                process.start()
            stack = Stack(env, env["BILLING_NAMESPACE"], f"http://127.0.0.1:{ports['ingest']}", "", processes,
                          tmp_path)
            apply_accounts(stack, tmp_path, [tenant], amount="20.00")
            wait_until(lambda: available(env, tmp_path, tenant) == Decimal(20), timeout=60, what="the account")
            ledger, admin = f"http://127.0.0.1:{ports['ledger']}/v1/accounts/{tenant}", auth("admin", tenant)
            for method, path, body in (
                    ("POST", "payment-methods", {"method_id": "pm_card_visa", "gateway": "stripe", "default": True}),
                    ("PUT", "auto-top-up", {"threshold": "5", "target": "30", "cooldown_seconds": 3600,
                                            "monthly_cap": "100"}),
                    ("POST", "adjustments", {"idempotency_key": "spend", "amount": "-18.00", "reason": "spent"})):
                # the adjustment is an operator's (a platform token), the settings the customer's own admin's
                headers = auth("admin") if path == "adjustments" else admin
                response = httpx.request(method, f"{ledger}/{path}", json=body, headers=headers, timeout=10)
                assert response.status_code in (200, 201), response.text

            # 2.00 left, below the threshold of 5: the ledger charges the saved card off-session at the fake Stripe.
            wait_until(lambda: api.intents, timeout=30, what="the off-session payment intent")
            [(intent_id, intent)] = api.intents.items()
            assert (intent["payment_method"], intent["confirm"], intent["off_session"]) == (
                "pm_card_visa", "true", "true")
            assert intent["metadata"]["tenant"] == tenant and intent["metadata"]["order_id"]
            time.sleep(1.5)  # processing: no credit yet, and no second charge
            assert available(env, tmp_path, tenant) == Decimal(2) and len(api.intents) == 1

            # Stripe's webhook: ingest verifies it, re-fetches the intent from the fake API, the ledger pays the order.
            settled = api.settle(intent_id)
            body = json.dumps({"id": "evt_auto_1", "object": "event", "type": "payment_intent.succeeded",
                               "created": int(time.time()), "data": {"object": settled}})
            header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
            response = httpx.post(f"{stack.ingest_url}/v1/webhooks/stripe", content=body.encode(), timeout=10,
                                  headers={"Stripe-Signature": header, "Content-Type": "application/json"})
            assert response.status_code == 200, response.text
            assert any(r.method == "GET" and r.path == f"/v1/payment_intents/{intent_id}" for r in fake.requests)
            wait_until(lambda: available(env, tmp_path, tenant) == Decimal(30), timeout=60,
                       what="the auto-top-up's credit (2.00 + 28.00)")
        finally:
            for process in processes.values():
                process.stop()
