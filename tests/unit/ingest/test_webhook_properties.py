"""Property tests for the webhook route: random bodies and headers, unsigned or correctly signed, never make
it fail (no 5xx) and never publish anything unless the gateway's API confirmed a payment."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from billing_events import topics
from billing_ingest.webhooks import razorpay
from billing_ingest.webhooks import stripe as stripe_gateway
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.ingest.harness import Ingest
from tests.unit.ingest.test_webhooks_razorpay import SECRET as RAZORPAY_SECRET
from tests.unit.ingest.test_webhooks_razorpay import SETTINGS as RAZORPAY_SETTINGS
from tests.unit.ingest.test_webhooks_stripe import SECRET as STRIPE_SECRET
from tests.unit.ingest.test_webhooks_stripe import SETTINGS as STRIPE_SETTINGS
from tests.unit.ingest.test_webhooks_stripe import FakeStripeApi

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15)
# Event-shaped bodies with random parts, so signed bodies reach the adapters' parsing, not just the JSON check.
stripe_like = st.fixed_dictionaries({
    "id": st.one_of(st.text(max_size=8), st.integers(), st.none()),
    "type": st.sampled_from(["checkout.session.completed", "payment_intent.succeeded", "refund.created",
                             "customer.created"]) | st.text(max_size=5),
    "data": st.one_of(json_values, st.fixed_dictionaries({"object": st.one_of(
        json_values, st.fixed_dictionaries({"id": st.one_of(st.text(max_size=8), st.integers())}))})),
})
razorpay_like = st.fixed_dictionaries({
    "event": st.sampled_from(["payment.captured", "refund.processed", "order.paid"]) | st.text(max_size=5),
    "payload": st.one_of(json_values, st.fixed_dictionaries({
        "payment": st.one_of(json_values, st.fixed_dictionaries({"entity": st.one_of(
            json_values, st.fixed_dictionaries({"id": st.one_of(st.text(max_size=10), st.integers())}))})),
        "refund": json_values})),
    "created_at": st.one_of(st.just(-1), st.integers(), st.just(0)).map(lambda d: int(time.time()) + d
                                                                         if abs(d) < 10**6 else d),
})


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Ingest]]:
    api = FakeStripeApi()  # knows no objects: nothing can be confirmed
    gateways: dict[str, Any] = {
        "stripe": stripe_gateway.build(STRIPE_SETTINGS, http_client=api),
        "razorpay": razorpay.build(RAZORPAY_SETTINGS, transport=httpx.MockTransport(
            lambda request: httpx.Response(404, json={"error": {"code": "BAD_REQUEST_ERROR"}}))),
    }
    ingest = Ingest(Path(tmp_path_factory.mktemp("webhook-properties")), gateways)
    with TestClient(ingest.app) as client:
        client.portal.call(ingest.start)
        yield client, ingest
        client.portal.call(ingest.stop)


def check(client: TestClient, ingest: Ingest, response: httpx.Response) -> None:
    assert response.status_code in (200, 400, 409, 413, 422), response.text
    if response.status_code != 200:
        assert response.headers["content-type"].startswith("application/problem+json")
    assert client.portal.call(ingest.published, topics.PAYMENTS) == []


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       header=st.text(max_size=80), gateway=st.sampled_from(["stripe", "razorpay"]))
def test_unsigned_or_badly_signed_webhooks_are_refused_cleanly(running: tuple[TestClient, Ingest], body: bytes,
                                                             header: str, gateway: str) -> None:
    client, ingest = running
    name = "Stripe-Signature" if gateway == "stripe" else "X-Razorpay-Signature"
    safe_header = header.encode("ascii", "ignore").decode().replace("\r", "").replace("\n", "")
    response = client.post(f"/v1/webhooks/{gateway}", content=body, headers={name: safe_header})
    check(client, ingest, response)
    assert response.status_code == 400


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stripe_body=stripe_like, razorpay_body=razorpay_like)
def test_correctly_signed_random_events_never_fail_and_never_publish_unconfirmed(
        running: tuple[TestClient, Ingest], stripe_body: dict[str, Any], razorpay_body: dict[str, Any]) -> None:
    client, ingest = running
    payload = json.dumps(stripe_body)
    signature = stripe.WebhookSignature.generate_signature_header(payload, STRIPE_SECRET)
    check(client, ingest, client.post("/v1/webhooks/stripe", content=payload,
                                      headers={"Stripe-Signature": signature}))
    raw = json.dumps(razorpay_body).encode()
    digest = hmac.new(RAZORPAY_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    check(client, ingest, client.post("/v1/webhooks/razorpay", content=raw,
                                      headers={"X-Razorpay-Signature": digest}))
