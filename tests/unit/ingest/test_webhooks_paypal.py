"""PayPal webhooks through ``POST /v1/webhooks/paypal``: an httpx.MockTransport stands in for PayPal's OAuth,
verify-webhook-signature and captures API (an offline fake of an external API)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events import topics
from billing_ingest.webhooks import paypal
from billing_runtime.settings import Settings

from tests.unit.ingest.harness import TENANT, Ingest

SETTINGS = Settings(paypal_client_id="pp-client", paypal_client_secret="pp-secret", paypal_webhook_id="WH-ID-1",
                    paypal_api_base="https://paypal.test")
GOOD_SIGNATURE = "signature-that-paypal-accepts"


class FakePayPalApi:
    def __init__(self) -> None:
        self.captures: dict[str, dict[str, Any]] = {}
        self.refunds: dict[str, dict[str, Any]] = {}
        self.orders: dict[str, dict[str, Any]] = {}  # approved checkout orders, captured on request
        self.calls: list[str] = []
        self.verify_requests: list[bytes] = []
        self.capture_request_ids: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(f"{request.method} {request.url.path}")
        if request.url.path == "/v1/oauth2/token":
            assert request.headers["authorization"].startswith("Basic ")
            return httpx.Response(200, json={"access_token": "token-1", "expires_in": 32400})
        assert request.headers["authorization"] == "Bearer token-1"
        if request.url.path == "/v1/notifications/verify-webhook-signature":
            self.verify_requests.append(request.content)
            sent = json.loads(request.content)
            good = sent["transmission_sig"] == GOOD_SIGNATURE and sent["webhook_id"] == "WH-ID-1"
            return httpx.Response(200, json={"verification_status": "SUCCESS" if good else "FAILURE"})
        if request.method == "POST" and request.url.path.startswith("/v2/checkout/orders/"):
            order = self.orders[request.url.path.split("/")[4]]
            self.capture_request_ids.append(request.headers["paypal-request-id"])
            if order["status"] == "COMPLETED":
                return httpx.Response(422, json={"name": "UNPROCESSABLE_ENTITY",
                                                 "details": [{"issue": "ORDER_ALREADY_CAPTURED"}]})
            order["status"] = "COMPLETED"
            capture = order["purchase_units"][0]["payments"]["captures"][0]
            self.captures[capture["id"]] = capture
            return httpx.Response(201, json=order)
        if request.method == "GET" and request.url.path.startswith("/v2/checkout/orders/"):
            return httpx.Response(200, json=self.orders[request.url.path.split("/")[4]])
        if request.url.path.startswith("/v2/payments/refunds/"):
            refund = self.refunds.get(request.url.path.rsplit("/", 1)[-1])
            return httpx.Response(200, json=refund) if refund else httpx.Response(404, json={"name": "NOT_FOUND"})
        if request.url.path.startswith("/v2/payments/captures/"):
            capture = self.captures.get(request.url.path.rsplit("/", 1)[-1])
            return httpx.Response(200, json=capture) if capture else httpx.Response(404, json={"name": "NOT_FOUND"})
        return httpx.Response(404)

    def capture(self, capture_id: str = "CAP-1", status: str = "COMPLETED") -> None:
        self.captures[capture_id] = {"id": capture_id, "status": status, "custom_id": TENANT,
                                     "invoice_id": "order-9", "amount": {"currency_code": "EUR", "value": "12.34"}}

    def refund(self, refund_id: str = "REF-1", capture_id: str = "CAP-1") -> None:
        """A completed refund of ``capture_id`` (PayPal links it ``up`` to the capture)."""
        self.refunds[refund_id] = {
            "id": refund_id, "status": "COMPLETED", "custom_id": TENANT, "invoice_id": "order-9",
            "amount": {"currency_code": "EUR", "value": "2.34"},
            "links": [{"href": f"https://api.paypal.test/v2/payments/refunds/{refund_id}", "rel": "self"},
                      {"href": f"https://api.paypal.test/v2/payments/captures/{capture_id}", "rel": "up"}]}

    def approved_order(self, order_id: str = "PP-ORDER-1", capture_status: str = "COMPLETED") -> None:
        """An order created with intent CAPTURE and approved by the customer: no money has moved yet."""
        capture = {"id": "CAP-7", "status": capture_status, "custom_id": TENANT, "invoice_id": "order-9",
                   "amount": {"currency_code": "EUR", "value": "12.34"}}
        self.orders[order_id] = {"id": order_id, "status": "APPROVED", "purchase_units": [
            {"custom_id": TENANT, "invoice_id": "order-9", "payments": {"captures": [capture]}}]}


def approved(order_id: str = "PP-ORDER-1", event_id: str = "WH-EVT-APPROVED") -> bytes:
    return json.dumps({"id": event_id, "event_type": "CHECKOUT.ORDER.APPROVED", "resource_type": "checkout-order",
                       "resource": {"id": order_id, "status": "APPROVED"}}).encode()


def event(capture_id: str = "CAP-1") -> bytes:
    return json.dumps({"id": "WH-EVT-1", "event_type": "PAYMENT.CAPTURE.COMPLETED", "resource_type": "capture",
                       "resource": {"id": capture_id, "status": "COMPLETED",
                                    "amount": {"currency_code": "EUR", "value": "99999.00"}}}).encode()


def transmission(signature: str = GOOD_SIGNATURE) -> dict[str, str]:
    return {"PAYPAL-AUTH-ALGO": "SHA256withRSA", "PAYPAL-CERT-URL": "https://paypal.test/cert.pem",
            "PAYPAL-TRANSMISSION-ID": "tx-1", "PAYPAL-TRANSMISSION-SIG": signature,
            "PAYPAL-TRANSMISSION-TIME": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "Content-Type": "application/json"}


@pytest.fixture
def api() -> FakePayPalApi:
    return FakePayPalApi()


@pytest.fixture
async def ingest(tmp_path: Path, api: FakePayPalApi) -> AsyncIterator[Ingest]:
    gateway = paypal.build(SETTINGS, transport=httpx.MockTransport(api))
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"paypal": gateway}).start()
    yield ingest
    await ingest.stop()


async def test_a_verified_completed_capture_is_published(ingest: Ingest, api: FakePayPalApi) -> None:
    api.capture()
    body = event()
    response = await ingest.http.post("/v1/webhooks/paypal", content=body, headers=transmission())
    assert response.status_code == 200, response.text
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["gateway"], payment["tenant"], payment["order_id"]) == ("paypal", TENANT, "order-9")
    assert (Decimal(payment["amount"]), payment["currency"]) == (Decimal("12.34"), "EUR")  # the API's, not the body's
    assert api.calls == ["POST /v1/oauth2/token", "POST /v1/notifications/verify-webhook-signature",
                         "GET /v2/payments/captures/CAP-1"]
    # The event goes to PayPal's check byte for byte as received.
    assert api.verify_requests[0].endswith(b'"webhook_event": ' + body + b"}")


async def test_a_forged_webhook_is_refused_and_nothing_is_fetched(ingest: Ingest, api: FakePayPalApi) -> None:
    api.capture()
    response = await ingest.http.post("/v1/webhooks/paypal", content=event(), headers=transmission("forged"))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await ingest.published(topics.PAYMENTS) == []
    assert "GET /v2/payments/captures/CAP-1" not in api.calls


async def test_missing_transmission_headers_are_refused_without_calling_paypal(ingest: Ingest,
                                                                              api: FakePayPalApi) -> None:
    response = await ingest.http.post("/v1/webhooks/paypal", content=event(),
                                      headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert api.calls == []


async def test_a_replayed_paypal_event_is_refused(ingest: Ingest, api: FakePayPalApi) -> None:
    api.capture()
    body = event()
    assert (await ingest.http.post("/v1/webhooks/paypal", content=body, headers=transmission())).status_code == 200
    again = await ingest.http.post("/v1/webhooks/paypal", content=body, headers=transmission())
    assert again.status_code == 409
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_a_capture_paypal_says_is_pending_is_not_published(ingest: Ingest, api: FakePayPalApi) -> None:
    api.capture(status="PENDING")
    response = await ingest.http.post("/v1/webhooks/paypal", content=event(), headers=transmission())
    assert response.status_code == 422
    assert await ingest.published(topics.PAYMENTS) == []


async def test_an_approved_checkout_order_is_captured_once_and_published(ingest: Ingest, api: FakePayPalApi) -> None:
    api.approved_order()
    response = await ingest.http.post("/v1/webhooks/paypal", content=approved(), headers=transmission())
    assert response.status_code == 200, response.text
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["tenant"], payment["order_id"]) == ("payment_succeeded", TENANT, "order-9")
    assert (Decimal(payment["amount"]), payment["currency"], payment["gateway_reference"]) == (
        Decimal("12.34"), "EUR", "CAP-7")
    assert api.capture_request_ids == ["capture-PP-ORDER-1"]  # PayPal's idempotency key: the order
    # PayPal retries the webhook (a new delivery id): the order is captured already, nothing more is published.
    again = await ingest.http.post("/v1/webhooks/paypal", content=approved(event_id="WH-EVT-APPROVED-2"),
                                   headers=transmission())
    assert again.status_code == 200 and again.json()["status"] == "already_notified", again.text
    # The capture's own event that follows publishes nothing more either.
    completed = event("CAP-7")
    after = await ingest.http.post("/v1/webhooks/paypal", content=completed, headers=transmission())
    assert after.status_code == 200 and after.json()["status"] == "already_notified", after.text
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_an_approved_order_whose_capture_is_pending_waits_for_the_capture_event(ingest: Ingest,
                                                                                   api: FakePayPalApi) -> None:
    api.approved_order(capture_status="PENDING")
    response = await ingest.http.post("/v1/webhooks/paypal", content=approved(), headers=transmission())
    assert response.status_code == 200 and response.json()["status"] == "ignored", response.text
    assert api.capture_request_ids == ["capture-PP-ORDER-1"]  # captured, but the money has not arrived yet
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_completed_refund_names_the_capture_it_gave_back(ingest: Ingest, api: FakePayPalApi) -> None:
    api.refund("REF-1", "CAP-1")
    body = json.dumps({"id": "WH-EVT-R1", "event_type": "PAYMENT.CAPTURE.REFUNDED", "resource_type": "refund",
                       "resource": {"id": "REF-1", "status": "COMPLETED"}}).encode()
    response = await ingest.http.post("/v1/webhooks/paypal", content=body, headers=transmission())
    assert response.status_code == 200, response.text
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["gateway_reference"], Decimal(payment["amount"])) == (
        "refund_succeeded", "REF-1", Decimal("2.34"))
    assert payment["refunded_payment"] == "CAP-1"  # the ledger credits an invoice only for the capture that paid it
