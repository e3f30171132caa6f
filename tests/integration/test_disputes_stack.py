"""A card dispute on the real stack (``billing serve`` processes, Kafka, PostgreSQL, fresh namespace): Razorpay's
signed webhooks go through ingest's webhook route and payment core (its PostgreSQL schema, a Kafka producer; the
gateway's API answered offline, as in every test), the notifications reach the two ledger processes over
``billing.payments``, and the projections show the chargeback. The payment grants 50.00 of credit; the dispute is
opened, then lost: the 50.00 leave the wallet once (the lost webhook redelivered is refused as a replay, its
notification redelivered on Kafka is a duplicate), the history has ``dispute`` rows, the figures count a
chargeback of 50.00, and ``billing audit verify`` agrees with the projection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_cli.audit import app as audit_cli
from billing_events.messages import PaymentNotification
from billing_ingest.http import build_webhook_router
from billing_ingest.payments import PaymentWebhooks
from billing_ingest.webhooks import razorpay
from billing_runtime.bus import KafkaBus
from billing_runtime.db import open_database
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from typer.testing import CliRunner

from tests.integration.conftest import Stack
from tests.integration.test_payments_stack import produce_payments
from tests.integration.test_walking_skeleton import apply_accounts, wait_balance
from tests.support import auth, wait_until

pytestmark = pytest.mark.integration
SECRET = "rzp_dispute_webhook_secret"


class RazorpayApi:
    """Razorpay's API for one captured payment of 50.00 USD and its dispute (offline)."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.objects: dict[str, dict[str, Any]] = {
            "/v1/payments/pay_D1": {"id": "pay_D1", "entity": "payment", "amount": 5000, "currency": "USD",
                                    "status": "captured", "notes": {"tenant": tenant, "order_id": "order-d1"}}}

    def dispute(self, status: str, deducted: int = 0) -> None:
        self.objects["/v1/disputes/disp_D1"] = {
            "id": "disp_D1", "entity": "dispute", "payment_id": "pay_D1", "amount": 5000, "currency": "USD",
            "amount_deducted": deducted, "reason_code": "chargeback", "status": status, "phase": "chargeback",
            "created_at": int(time.time()), "respond_by": int(time.time()) + 86400}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        found = self.objects.get(request.url.path)
        return httpx.Response(200, json=found) if found else httpx.Response(404, json={"error": {}})


def webhook(name: str, entity: str, entity_id: str, tenant: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"entity": "event", "account_id": "acc_1", "event": name, "contains": [entity],
                       "payload": {entity: {"entity": {"id": entity_id, "entity": entity}}},
                       "created_at": int(time.time())}).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {"X-Razorpay-Signature": signature, "X-Razorpay-Event-Id": f"evt_{name}_{tenant}",
                  "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def ingest_webhooks(stack: Stack, name: str, gateway: Any, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Ingest's webhook route for ``gateway`` (its API answered offline) on the stack's Kafka and ingest schema."""
    db = await open_database("ingest", settings)
    bus = KafkaBus(stack.env["KAFKA_BOOTSTRAP_SERVERS"], namespace=stack.namespace, client_id="dispute-test")
    await bus.start()
    webhooks = PaymentWebhooks(db, bus, {name: gateway})
    await webhooks.setup()
    app = create_app("ingest (dispute test)", settings)
    app.include_router(build_webhook_router(webhooks, settings.webhook_body_bytes_max))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ingest") as http:
            yield http
    finally:
        await webhooks.close()
        await bus.stop()
        await db.close()


async def through_ingest(stack: Stack, api: RazorpayApi, steps: list[tuple[str, str, str, str, int]]) -> None:
    """Each webhook through ingest's route, on the stack's Kafka and ingest schema; ``steps``: (webhook, entity,
    id, dispute status to answer, expected HTTP status)."""
    settings = Settings(database_url=stack.env["DATABASE_URL"], namespace=stack.namespace,
                        razorpay_key_id="rzp_key", razorpay_key_secret="rzp_secret", razorpay_webhook_secret=SECRET)
    gateway = razorpay.build(settings, transport=httpx.MockTransport(api))
    assert gateway is not None
    async with ingest_webhooks(stack, "razorpay", gateway, settings) as http:
        for name, entity, entity_id, status, expected in steps:
            if status:
                api.dispute(status, deducted=5000 if status == "lost" else 0)
            body, headers = webhook(name, entity, entity_id, api.tenant)
            response = await http.post("/v1/webhooks/razorpay", content=body, headers=headers)
            assert response.status_code == expected, response.text


def rows(stack: Stack, tenant: str, path: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.projections_url}/v1/accounts/{tenant}/{path}", headers=auth("viewer", tenant))
    response.raise_for_status()
    return response.json()["items"]  # type: ignore[no-any-return]


def test_a_lost_dispute_through_ingest_takes_the_credit_back_once_and_shows_as_a_chargeback(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"dispute-{uuid.uuid4().hex[:6]}"
    apply_accounts(stack, tmp_path, [tenant], amount="20.00")
    wait_balance(stack, tenant, Decimal("20.00"))
    api = RazorpayApi(tenant)
    asyncio.run(through_ingest(stack, api, [("payment.captured", "payment", "pay_D1", "", 200)]))
    wait_balance(stack, tenant, Decimal("70.00"))  # 20.00 welcome credit + 50.00 bought

    asyncio.run(through_ingest(stack, api, [
        ("payment.dispute.created", "dispute", "disp_D1", "open", 200),
        ("payment.dispute.lost", "dispute", "disp_D1", "lost", 200),
        ("payment.dispute.lost", "dispute", "disp_D1", "lost", 409)]))  # the same webhook again: a replay
    wait_balance(stack, tenant, Decimal("20.00"))
    # Its notification redelivered on Kafka (a producer's retry) is a duplicate command; a marker payment behind it on
    # the same partition shows when it was consumed.
    lost = PaymentNotification(gateway="razorpay", gateway_event_id=f"evt_payment.dispute.lost_{tenant}",
                               kind="dispute_closed", tenant=tenant, order_id="order-d1", amount=Decimal("50.00"),
                               currency="USD", verified_at=datetime.now(UTC), gateway_reference="disp_D1/lost",
                               dispute="disp_D1", disputed_payment="pay_D1", dispute_outcome="lost")
    marker = PaymentNotification(gateway="stripe", gateway_event_id=f"evt_marker_{tenant}", kind="payment_succeeded",
                                 tenant=tenant, order_id="marker", amount=Decimal("1.00"), currency="USD",
                                 verified_at=lost.verified_at, gateway_reference="pi_marker")
    asyncio.run(produce_payments(stack, [lost, marker]))
    wait_balance(stack, tenant, Decimal("21.00"))

    history = rows(stack, tenant, "transactions?type=dispute")
    assert {row["detail"].split(";")[0] for row in history} >= {"opened", "lost", "chargeback disp_D1"}
    [chargeback] = [row for row in history if row["detail"].startswith("chargeback")]
    assert (chargeback["amount"], chargeback["wallet_delta"]) == ("-50.00", "-50.00")
    assert rows(stack, tenant, "transactions?type=refund") == []
    wait_until(lambda: [f["chargebacks"] for f in rows(stack, tenant, "figures?granularity=month")
                        if f["unit"] == "USD"] == ["50.00"], timeout=30, what="the chargeback in the figures")

    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    verified = CliRunner().invoke(audit_cli, ["verify", "--tenant", tenant, "--projections-url",
                                              stack.projections_url, "--wait-seconds", "30"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["ok"]


async def through_stripe(stack: Stack, api: Any, steps: list[tuple[str, str, str, dict[str, Any]]]) -> None:
    """Stripe's signed webhooks through ingest's route; ``steps``: (event type, event id, object, the object as
    Stripe's API answers it then: a payment intent or the dispute)."""
    from billing_ingest.webhooks import stripe as stripe_gateway

    from tests.unit.ingest.test_webhook_disputes import stripe_event
    from tests.unit.ingest.test_webhooks_stripe import SETTINGS as STRIPE_SETTINGS
    from tests.unit.ingest.test_webhooks_stripe import signed

    settings = Settings(database_url=stack.env["DATABASE_URL"], namespace=stack.namespace,
                        stripe_api_key=STRIPE_SETTINGS.stripe_api_key,
                        stripe_webhook_secret=STRIPE_SETTINGS.stripe_webhook_secret)
    gateway = stripe_gateway.build(settings, http_client=api)
    assert gateway is not None
    async with ingest_webhooks(stack, "stripe", gateway, settings) as http:
        for event_type, event_id, path, answer in steps:
            api.objects[path] = answer
            body = stripe_event(event_type, answer, event_id)
            response = await http.post("/v1/webhooks/stripe", content=body.encode(), headers=signed(body))
            assert response.status_code == 200, response.text


def test_a_stripe_dispute_fee_through_ingest_is_the_operators_expense_in_the_books_and_the_figures(
        stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Stripe payment of 50.00, disputed: Stripe withdraws the 50.00 and charges its 15.00 dispute fee (the
    withdrawal's balance transaction), and the dispute is lost. The chargeback takes the credit back; the fee, taken
    from the gateway's balance too, is booked as the operator's expense (``dispute_fees``), not the tenant's, and
    shows in the figures and the history; ``billing audit verify`` agrees with the projection."""
    from tests.unit.ingest.test_webhook_disputes import stripe_dispute
    from tests.unit.ingest.test_webhooks_stripe import FakeStripeApi

    tenant = f"dispfee-{uuid.uuid4().hex[:6]}"
    apply_accounts(stack, tmp_path, [tenant], amount="20.00")
    wait_balance(stack, tenant, Decimal("20.00"))
    api = FakeStripeApi()
    api.intent("pi_F1", amount=5000, metadata={"tenant": tenant, "order_id": "order-f1"})
    intent = api.objects["/v1/payment_intents/pi_F1"]
    disputed = {**stripe_dispute(amount=5000), "id": "dp_F1", "payment_intent": "pi_F1"}
    asyncio.run(through_stripe(stack, api, [
        ("payment_intent.succeeded", "evt_pay_f1", "/v1/payment_intents/pi_F1", intent)]))
    wait_balance(stack, tenant, Decimal("70.00"))
    asyncio.run(through_stripe(stack, api, [
        ("charge.dispute.funds_withdrawn", "evt_w_f1", "/v1/disputes/dp_F1", disputed),
        ("charge.dispute.closed", "evt_l_f1", "/v1/disputes/dp_F1", {**disputed, "status": "lost"})]))

    def usd_figures() -> tuple[Any, Any]:
        found = next((f for f in rows(stack, tenant, "figures?granularity=month") if f["unit"] == "USD"), {})
        return found.get("chargebacks"), found.get("dispute_fees")

    wait_until(lambda: usd_figures() == ("50.00", "15.00"), timeout=30, what="the chargeback and its fee in the figures")
    wait_balance(stack, tenant, Decimal("20.00"))  # the 50.00 charged back; the fee is not the tenant's
    fee_rows = [r for r in rows(stack, tenant, "transactions?type=dispute") if r["detail"].startswith("fee")]
    assert [(r["reference"], r["amount"], r["wallet_delta"]) for r in fee_rows] == [("dp_F1", "0.00", "0.00")]
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    verified = CliRunner().invoke(audit_cli, ["verify", "--tenant", tenant, "--projections-url",
                                              stack.projections_url, "--wait-seconds", "30"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["ok"]
