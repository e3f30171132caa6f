"""Review (session 13) findings: webhooks outside the timestamp window were accepted.

Stripe: the window was checked on another ``t=`` than the one signed (the SDK verifies the item whose key is
exactly ``t``; the window read the first key equal to ``t`` after stripping spaces), so a captured, long-expired
webhook was accepted again with `` t=<now>`` put in front of its header. PayPal: the transmission time was never
compared with the clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import stripe
from billing_events import topics
from billing_ingest.webhooks import paypal
from billing_ingest.webhooks import stripe as stripe_gateway

from tests.unit.ingest.harness import Ingest
from tests.unit.ingest.test_webhooks_paypal import SETTINGS as PAYPAL_SETTINGS
from tests.unit.ingest.test_webhooks_paypal import FakePayPalApi, transmission
from tests.unit.ingest.test_webhooks_paypal import event as paypal_event
from tests.unit.ingest.test_webhooks_stripe import SECRET, SETTINGS, FakeStripeApi, post, session_completed


@pytest.fixture
async def ingest(tmp_path: Path) -> AsyncIterator[tuple[Ingest, FakeStripeApi]]:
    api = FakeStripeApi()
    gateway = stripe_gateway.build(SETTINGS, http_client=api)
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"stripe": gateway}).start()
    yield ingest, api
    await ingest.stop()



async def test_an_expired_signature_with_a_fresh_spaced_timestamp_in_front_is_refused(
        ingest: tuple[Ingest, FakeStripeApi]) -> None:
    service, api = ingest
    api.session()
    payload = session_completed()
    stale = int(time.time()) - SETTINGS.stripe_webhook_tolerance_seconds - 3600  # captured an hour too late
    original = stripe.WebhookSignature.generate_signature_header(payload, SECRET, timestamp=stale)
    forged = f" t={int(time.time())},{original}"  # no secret needed to add this
    response = await post(service, payload, {"Stripe-Signature": forged, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("/webhook-expired")
    assert await service.published(topics.PAYMENTS) == []


async def test_a_fresh_signature_with_a_second_timestamp_is_refused(ingest: tuple[Ingest, FakeStripeApi]) -> None:
    service, api = ingest
    api.session()
    payload = session_completed()
    now = int(time.time())
    genuine = stripe.WebhookSignature.generate_signature_header(payload, SECRET, timestamp=now)
    response = await post(service, payload, {"Stripe-Signature": f"{genuine}, t={now - 7200}",
                                             "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await service.published(topics.PAYMENTS) == []


async def test_a_paypal_webhook_transmitted_a_year_ago_is_refused(tmp_path: Path) -> None:
    api = FakePayPalApi()
    api.capture()
    gateway = paypal.build(PAYPAL_SETTINGS, transport=httpx.MockTransport(api))
    assert gateway is not None
    service = await Ingest(tmp_path, {"paypal": gateway}).start()
    try:
        old = {**transmission(), "PAYPAL-TRANSMISSION-TIME": "2025-11-01T10:00:00Z"}
        response = await service.http.post("/v1/webhooks/paypal", content=paypal_event(), headers=old)
        assert response.status_code == 400, response.text
        assert response.json()["type"].endswith("/webhook-expired")
        assert await service.published(topics.PAYMENTS) == []
    finally:
        await service.stop()
