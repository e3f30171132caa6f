"""The gateway-independent webhook core and registry, with a minimal in-test gateway: adding a gateway needs
no branch in core code; a notification is recorded only once it is durable on the bus."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_events import topics
from billing_ingest.webhooks import (
    Confirmation,
    ConfirmedPayment,
    RefusalKind,
    Refused,
    VerifiedEvent,
    registry,
)
from billing_runtime.bus import OutMessage
from billing_runtime.settings import Settings

from tests.unit.ingest.harness import TENANT, Ingest


class AcmePay:
    """A toy gateway: the body is ``{"id": ..., "ref": ..., "sig": "ok"}``; everything it says is paid."""

    name = "acmepay"

    async def verify(self, raw_body: bytes, headers: Mapping[str, str], now: datetime) -> VerifiedEvent | Refused:
        body = json.loads(raw_body)
        if body.get("sig") != "ok":
            return Refused(RefusalKind.SIGNATURE_INVALID, "bad signature")
        return VerifiedEvent(self.name, body["id"], "paid", body, replay_key=body["id"])

    async def confirm(self, event: VerifiedEvent) -> Confirmation:
        return ConfirmedPayment("payment_succeeded", TENANT, "order-1", Decimal("5.00"), "USD",
                                str(event.payload["ref"]))

    async def close(self) -> None:
        return None


class FlakyBus:
    """Delegates to the real bus, but the next publish can be made to fail (a broker outage)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.fail_next = False

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker unavailable")
        await self.inner.publish(messages)  # type: ignore[attr-defined]


def body(event_id: str, ref: str = "pay-1", sig: str = "ok") -> bytes:
    return json.dumps({"id": event_id, "ref": ref, "sig": sig}).encode()


def test_no_gateway_is_enabled_without_settings() -> None:
    assert registry.enabled_gateways(Settings()) == {}


def test_a_gateway_is_enabled_by_its_settings() -> None:
    gateways = registry.enabled_gateways(Settings(stripe_api_key="sk_test_1", stripe_webhook_secret="whsec_1"))
    assert sorted(gateways) == ["stripe"]


@pytest.mark.parametrize("settings", [
    Settings(stripe_webhook_secret="whsec_1"),  # no API key: could not re-fetch payments
    Settings(razorpay_key_id="k", razorpay_webhook_secret="s"),
    Settings(paypal_client_id="c", paypal_client_secret="s"),
])
def test_a_half_configured_gateway_fails_at_startup(settings: Settings) -> None:
    with pytest.raises(ValueError, match="need"):
        registry.enabled_gateways(settings)


def test_adding_a_gateway_is_a_registry_entry() -> None:
    gateways = registry.enabled_gateways(Settings(), {"acmepay": lambda settings: AcmePay()})
    assert list(gateways) == ["acmepay"]


async def test_a_new_gateway_works_through_the_core_without_core_changes(tmp_path: Path) -> None:
    ingest = await Ingest(tmp_path, {"acmepay": AcmePay()}).start()
    try:
        ok = await ingest.http.post("/v1/webhooks/acmepay", content=body("e1"))
        assert (ok.status_code, ok.json()["status"]) == (200, "published")
        forged = await ingest.http.post("/v1/webhooks/acmepay", content=body("e2", sig="no"))
        assert forged.status_code == 400
        assert (await ingest.http.post("/v1/webhooks/acmepay", content=body("e1"))).status_code == 409
        assert len(await ingest.published(topics.PAYMENTS)) == 1
    finally:
        await ingest.stop()


async def test_a_notification_that_could_not_be_published_is_published_by_the_retry(tmp_path: Path) -> None:
    ingest = await Ingest(tmp_path, {"acmepay": AcmePay()}).start()
    flaky = FlakyBus(ingest.bus)
    ingest.webhooks.bus = flaky  # type: ignore[assignment]
    try:
        flaky.fail_next = True
        failed = await ingest.http.post("/v1/webhooks/acmepay", content=body("e1"))
        assert failed.status_code == 503  # the gateway retries
        assert failed.headers["content-type"].startswith("application/problem+json")
        # The event is not marked processed, so the retry is processed, not refused as a replay.
        assert await ingest.db.fetch("SELECT * FROM webhook_events") == []
        retry = await ingest.webhooks.handle("acmepay", body("e1"), {})
        assert retry.outcome == "published"
        assert len(await ingest.published(topics.PAYMENTS)) == 1
    finally:
        await ingest.stop()


async def test_an_unfinished_notification_is_the_one_published_whichever_event_comes_next(tmp_path: Path) -> None:
    ingest = await Ingest(tmp_path, {"acmepay": AcmePay()}).start()
    flaky = FlakyBus(ingest.bus)
    ingest.webhooks.bus = flaky  # type: ignore[assignment]
    try:
        flaky.fail_next = True
        assert (await ingest.webhooks.handle("acmepay", body("e1", ref="pay-1"), {})).status == 503
        # Another event for the same money arrives before e1's retry: it publishes e1's stored notification,
        # so the bus never carries two different notifications (event ids) for one payment.
        second = await ingest.webhooks.handle("acmepay", body("e2", ref="pay-1"), {})
        assert second.outcome == "already_notified"
        retry = await ingest.webhooks.handle("acmepay", body("e1", ref="pay-1"), {})
        assert retry.outcome == "published"
        [payment] = await ingest.published(topics.PAYMENTS)
        assert payment["gateway_event_id"] == "e1"
        assert (await ingest.webhooks.handle("acmepay", body("e1", ref="pay-1"), {})).status == 409
    finally:
        await ingest.stop()


async def test_a_second_event_for_the_same_money_is_answered_already_notified(tmp_path: Path) -> None:
    ingest = await Ingest(tmp_path, {"acmepay": AcmePay()}).start()
    try:
        assert (await ingest.webhooks.handle("acmepay", body("e1", ref="pay-1"), {})).outcome == "published"
        assert (await ingest.webhooks.handle("acmepay", body("e2", ref="pay-1"), {})).outcome == "already_notified"
        assert (await ingest.webhooks.handle("acmepay", body("e3", ref="pay-2"), {})).outcome == "published"
        assert len(await ingest.published(topics.PAYMENTS)) == 2
    finally:
        await ingest.stop()
