"""Razorpay webhooks through ``POST /v1/webhooks/razorpay``: HMAC-SHA256 signatures computed with hmac, the
payment confirmation answered by an httpx.MockTransport standing in for Razorpay's API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events import ids, topics
from billing_ingest.webhooks import razorpay
from billing_runtime.settings import Settings

from tests.unit.ingest.harness import TENANT, Ingest

SECRET = "rzp_webhook_secret"
SETTINGS = Settings(razorpay_key_id="rzp_test_key", razorpay_key_secret="rzp_test_secret",
                    razorpay_webhook_secret=SECRET)
NOTES = {"tenant": TENANT, "order_id": "order-7"}


class FakeRazorpayApi:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[str] = []
        self.auth: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request.url.path)
        self.auth.append(request.headers.get("authorization", ""))
        obj = self.objects.get(request.url.path)
        if obj is None:
            return httpx.Response(400, json={"error": {"code": "BAD_REQUEST_ERROR", "description": "not found"}})
        return httpx.Response(200, json=obj)

    def payment(self, payment_id: str = "pay_1", status: str = "captured", amount: int = 49900,
                notes: dict[str, str] | None = None) -> None:
        self.objects[f"/v1/payments/{payment_id}"] = {
            "id": payment_id, "entity": "payment", "amount": amount, "currency": "INR", "status": status,
            "notes": NOTES if notes is None else notes}

    def refund(self, refund_id: str = "rfnd_1", status: str = "processed", amount: int = 10000) -> None:
        self.objects[f"/v1/refunds/{refund_id}"] = {
            "id": refund_id, "entity": "refund", "amount": amount, "currency": "INR", "payment_id": "pay_1",
            "status": status, "notes": []}  # Razorpay sends an empty list for "no notes"


def event(name: str = "payment.captured", entity_id: str = "pay_1", created_at: int | None = None) -> bytes:
    kind = name.split(".")[0]
    # The body's amount and status are never trusted: the API's answer is.
    return json.dumps({"entity": "event", "account_id": "acc_1", "event": name, "contains": [kind],
                       "payload": {kind: {"entity": {"id": entity_id, "entity": kind, "amount": 49900,
                                                     "status": "captured"}}},
                       "created_at": int(time.time()) if created_at is None else created_at}).encode()


def signed(body: bytes, secret: str = SECRET, event_id: str = "evt_rzp_1") -> dict[str, str]:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Razorpay-Signature": signature, "X-Razorpay-Event-Id": event_id,
            "Content-Type": "application/json"}


@pytest.fixture
def api() -> FakeRazorpayApi:
    return FakeRazorpayApi()


@pytest.fixture
async def ingest(tmp_path: Path, api: FakeRazorpayApi) -> AsyncIterator[Ingest]:
    gateway = razorpay.build(SETTINGS, transport=httpx.MockTransport(api))
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"razorpay": gateway}).start()
    yield ingest
    await ingest.stop()


async def post(ingest: Ingest, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await ingest.http.post("/v1/webhooks/razorpay", content=body, headers=headers)


async def test_a_captured_payment_is_confirmed_and_published(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    body = event()
    response = await post(ingest, body, signed(body))
    assert response.status_code == 200, response.text
    [(key, payment)] = await ingest.published_with_keys(topics.PAYMENTS)
    assert key == str(ids.account_id(TENANT))
    assert (payment["gateway"], payment["kind"], payment["order_id"]) == ("razorpay", "payment_succeeded",
                                                                          "order-7")
    assert (Decimal(payment["amount"]), payment["currency"]) == (Decimal("499.00"), "INR")
    assert (payment["gateway_event_id"], payment["gateway_reference"]) == ("evt_rzp_1", "pay_1")
    assert api.calls == ["/v1/payments/pay_1"]
    expected_auth = "Basic " + base64.b64encode(b"rzp_test_key:rzp_test_secret").decode()
    assert api.auth == [expected_auth]


async def test_a_checkout_payment_is_attributed_by_its_razorpay_orders_notes(ingest: Ingest,
                                                                             api: FakeRazorpayApi) -> None:
    # Razorpay Checkout copies the notes given to Checkout onto the payment, not the order's: ours are on the order.
    api.payment(notes={})
    api.objects["/v1/payments/pay_1"]["order_id"] = "order_RZP1"
    api.objects["/v1/orders/order_RZP1"] = {"id": "order_RZP1", "entity": "order", "amount": 49900,
                                            "currency": "INR", "status": "paid", "notes": NOTES}
    body = event()
    response = await post(ingest, body, signed(body))
    assert response.status_code == 200, response.text
    [(key, payment)] = await ingest.published_with_keys(topics.PAYMENTS)
    assert (key, payment["order_id"]) == (str(ids.account_id(TENANT)), "order-7")
    assert api.calls == ["/v1/payments/pay_1", "/v1/orders/order_RZP1"]


async def test_a_forged_signature_is_refused(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    body = event()
    response = await post(ingest, body, signed(body, secret="guessed"))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await ingest.published(topics.PAYMENTS) == []
    assert api.calls == []


async def test_a_missing_signature_is_refused(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    response = await post(ingest, event(), {"Content-Type": "application/json"})
    assert response.status_code == 400
    assert await ingest.published(topics.PAYMENTS) == []


async def test_an_expired_event_is_refused(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    body = event(created_at=int(time.time()) - SETTINGS.razorpay_webhook_tolerance_seconds - 60)
    response = await post(ingest, body, signed(body))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-expired")
    assert await ingest.published(topics.PAYMENTS) == []
    assert api.calls == []


async def test_a_tampered_body_is_refused(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    api.payment("pay_2")
    body = event()
    headers = signed(body)
    response = await post(ingest, body.replace(b"pay_1", b"pay_2"), headers)
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_replayed_body_is_refused_even_under_a_new_event_id_header(ingest: Ingest,
                                                                          api: FakeRazorpayApi) -> None:
    api.payment()
    body = event()
    assert (await post(ingest, body, signed(body))).status_code == 200
    replay = await post(ingest, body, signed(body))
    assert replay.status_code == 409
    assert replay.json()["type"].endswith("/webhook-replayed")
    # The event id header is not signed: changing it must not make a captured body new again.
    disguised = await post(ingest, body, signed(body, event_id="evt_rzp_fresh"))
    assert disguised.status_code == 409
    assert len(await ingest.published(topics.PAYMENTS)) == 1
    assert api.calls == ["/v1/payments/pay_1"]


async def test_when_razorpay_says_not_captured_nothing_is_published(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment(status="authorized")
    body = event()  # the body claims "captured"
    response = await post(ingest, body, signed(body))
    assert response.status_code == 422
    assert response.json()["type"].endswith("/payment-not-confirmed")
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_payment_razorpay_does_not_know_is_not_confirmed(ingest: Ingest, api: FakeRazorpayApi) -> None:
    body = event(entity_id="pay_ghost")
    assert (await post(ingest, body, signed(body))).status_code == 422
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_processed_refund_takes_tenant_and_order_from_its_payment(ingest: Ingest,
                                                                        api: FakeRazorpayApi) -> None:
    api.payment(status="refunded")
    api.refund()
    body = event("refund.processed", "rfnd_1")
    response = await post(ingest, body, signed(body))
    assert response.status_code == 200, response.text
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["tenant"], payment["gateway_reference"]) == ("refund_succeeded", TENANT,
                                                                                  "rfnd_1")
    assert payment["refunded_payment"] == "pay_1"  # the payment it gave back
    assert Decimal(payment["amount"]) == Decimal("100.00")


async def test_a_pending_refund_is_not_confirmed(ingest: Ingest, api: FakeRazorpayApi) -> None:
    api.payment()
    api.refund(status="pending")
    body = event("refund.processed", "rfnd_1")
    assert (await post(ingest, body, signed(body))).status_code == 422
    assert await ingest.published(topics.PAYMENTS) == []


async def test_order_paid_is_ignored_because_payment_captured_carries_the_money(ingest: Ingest) -> None:
    body = event("order.paid", "order_1")
    response = await post(ingest, body, signed(body))
    assert (response.status_code, response.json()["status"]) == (200, "ignored")
    assert await ingest.published(topics.PAYMENTS) == []


async def test_razorpay_api_unreachable_answers_502_and_records_nothing(tmp_path: Path) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    gateway = razorpay.build(SETTINGS, transport=httpx.MockTransport(down))
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"razorpay": gateway}).start()
    try:
        body = event()
        response = await post(ingest, body, signed(body))
        assert response.status_code == 502
        assert await ingest.published(topics.PAYMENTS) == []
        assert await ingest.db.fetch("SELECT * FROM webhook_events") == []
    finally:
        await ingest.stop()
