"""Stripe webhooks end to end through ``POST /v1/webhooks/stripe``: signatures made by the stripe SDK's own
helper, the re-fetch answered offline by a ``stripe.HTTPClient`` subclass, the real embedded bus and SQLite."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import stripe
from billing_events import ids, topics
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_ingest.webhooks import stripe as stripe_gateway
from billing_runtime.settings import Settings

from tests.unit.ingest.harness import TENANT, Ingest

SECRET = "whsec_test_secret"
SETTINGS = Settings(stripe_api_key="sk_test_123", stripe_webhook_secret=SECRET)


class FakeStripeApi(stripe.HTTPClient):
    """Answers the SDK's API calls from ``objects`` (path -> JSON object); no network."""

    name = "fake-stripe"

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False

    def _answer(self, method: str, url: str) -> tuple[bytes, int, dict[str, str]]:
        parts = urlsplit(url)
        self.calls.append((method, parts.path + (f"?{parts.query}" if parts.query else "")))
        if self.down:
            return b'{"error": {"type": "api_error", "message": "Stripe is having a bad day"}}', 500, {}
        if parts.path == "/v1/checkout/sessions":
            wanted = parse_qs(parts.query).get("payment_intent", [""])[0]
            data = [o for o in self.objects.values()
                    if o.get("object") == "checkout.session" and o.get("payment_intent") == wanted]
            return json.dumps({"object": "list", "data": data, "has_more": False}).encode(), 200, {}
        obj = self.objects.get(parts.path)
        if obj is None:
            error = {"error": {"type": "invalid_request_error", "message": f"No such object: {parts.path}"}}
            return json.dumps(error).encode(), 404, {}
        if "expand[0]=payment_intent" in parts.query and isinstance(obj.get("payment_intent"), str):
            obj = {**obj, "payment_intent": self.objects.get(f"/v1/payment_intents/{obj['payment_intent']}")}
        if "expand[0]=customer" in parts.query and isinstance(obj.get("customer"), str):
            obj = {**obj, "customer": self.objects.get(f"/v1/customers/{obj['customer']}")}
        return json.dumps(obj).encode(), 200, {}

    def request(self, method: str, url: str, headers: Any, post_data: Any = None, *,
                _usage: Any = None) -> tuple[str, int, dict[str, str]]:
        body, status, headers_out = self._answer(method, url)
        return body.decode(), status, headers_out

    async def request_async(self, method: str, url: str, headers: Any,
                            post_data: Any = None) -> tuple[bytes, int, dict[str, str]]:
        return self._answer(method, url)

    def close(self) -> None:
        return None

    async def close_async(self) -> None:
        return None

    async def sleep_async(self, secs: float) -> None:  # the SDK's retry back-off: no need to wait offline
        return None

    def session(self, session_id: str = "cs_1", *, paid: bool = True, amount: int = 2500, currency: str = "usd",
                intent: str = "pi_1", metadata: dict[str, str] | None = None) -> None:
        self.objects[f"/v1/checkout/sessions/{session_id}"] = {
            "id": session_id, "object": "checkout.session", "status": "complete" if paid else "open",
            "payment_status": "paid" if paid else "unpaid", "amount_total": amount, "currency": currency,
            "payment_intent": intent,
            "metadata": {"tenant": TENANT, "order_id": "order-42"} if metadata is None else metadata}

    def intent(self, intent_id: str = "pi_1", *, status: str = "succeeded", amount: int = 2500,
               metadata: dict[str, str] | None = None) -> None:
        self.objects[f"/v1/payment_intents/{intent_id}"] = {
            "id": intent_id, "object": "payment_intent", "status": status, "amount_received": amount,
            "currency": "usd", "metadata": metadata or {}}

    def refund(self, refund_id: str = "re_1", *, status: str = "succeeded", amount: int = 1000,
               intent: str = "pi_1") -> None:
        self.objects[f"/v1/refunds/{refund_id}"] = {
            "id": refund_id, "object": "refund", "status": status, "amount": amount, "currency": "usd",
            "payment_intent": intent, "metadata": {}}


    def card_method(self, method_id: str = "pm_1", *, customer: str | None = "cus_1", exp_month: int = 4,
                    exp_year: int = 2031, metadata: dict[str, str] | None = None, kind: str = "card") -> None:
        """A saved PaymentMethod as Stripe's API answers it (its card's brand, last4 and expiry; never the number)."""
        self.objects[f"/v1/payment_methods/{method_id}"] = {
            "id": method_id, "object": "payment_method", "type": kind, "customer": customer,
            "metadata": metadata or {},
            **({"card": {"brand": "visa", "last4": "4242", "exp_month": exp_month, "exp_year": exp_year,
                         "funding": "credit"}} if kind == "card" else {})}

    def customer(self, customer_id: str = "cus_1", metadata: dict[str, str] | None = None) -> None:
        self.objects[f"/v1/customers/{customer_id}"] = {"id": customer_id, "object": "customer",
                                                        "metadata": {"tenant": TENANT} if metadata is None else metadata}

    def deleted_customer(self, customer_id: str = "cus_1") -> None:
        """What Stripe's API answers for a deleted customer: its id, nothing more."""
        self.objects[f"/v1/customers/{customer_id}"] = {"id": customer_id, "object": "customer", "deleted": True}

    def source_card(self, card_id: str = "card_1", *, customer: str = "cus_1", exp_month: int = 9,
                    exp_year: int = 2032, metadata: dict[str, str] | None = None) -> None:
        """A card saved as a source of a customer (the Cards API), as ``GET /v1/customers/{c}/sources/{id}`` answers."""
        self.objects[f"/v1/customers/{customer}/sources/{card_id}"] = {
            "id": card_id, "object": "card", "customer": customer, "brand": "Visa", "last4": "1881",
            "exp_month": exp_month, "exp_year": exp_year, "funding": "credit", "metadata": metadata or {}}


def event(event_type: str, obj: dict[str, Any], event_id: str = "evt_1") -> str:
    # What the body claims is never trusted: the test bodies even claim "paid" when Stripe says otherwise.
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "livemode": False,
                       "created": int(time.time()), "data": {"object": obj}})


def signed(payload: str, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    header = stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=timestamp)
    return {"Stripe-Signature": header, "Content-Type": "application/json"}


@pytest.fixture
def api() -> FakeStripeApi:
    return FakeStripeApi()


@pytest.fixture
async def ingest(tmp_path: Path, api: FakeStripeApi) -> AsyncIterator[Ingest]:
    gateway = stripe_gateway.build(SETTINGS, http_client=api)
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"stripe": gateway}).start()
    yield ingest
    await ingest.stop()


async def post(ingest: Ingest, payload: str, headers: dict[str, str], gateway: str = "stripe") -> Any:
    return await ingest.http.post(f"/v1/webhooks/{gateway}", content=payload.encode(), headers=headers)


def session_completed(session_id: str = "cs_1", event_id: str = "evt_1") -> str:
    return event("checkout.session.completed", {"id": session_id, "object": "checkout.session",
                                                "payment_status": "paid"}, event_id)


async def test_a_paid_checkout_session_publishes_one_payment_keyed_by_account(ingest: Ingest,
                                                                            api: FakeStripeApi) -> None:
    api.session()
    payload = session_completed()
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "published"
    [(key, payment)] = await ingest.published_with_keys(topics.PAYMENTS)
    assert key == str(ids.account_id(TENANT))
    assert PaymentNotification.model_validate(payment).schema_ == "payment/v1"
    assert (payment["gateway"], payment["gateway_event_id"], payment["kind"]) == ("stripe", "evt_1",
                                                                                  "payment_succeeded")
    assert (payment["tenant"], payment["order_id"], payment["currency"]) == (TENANT, "order-42", "USD")
    assert Decimal(payment["amount"]) == Decimal("25.00")
    assert payment["gateway_reference"] == "pi_1"
    assert api.calls == [("get", "/v1/checkout/sessions/cs_1")]


async def test_a_forged_signature_is_refused_and_nothing_is_published(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    payload = session_completed()
    response = await post(ingest, payload, signed(payload, secret="whsec_attacker"))
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await ingest.published(topics.PAYMENTS) == []
    assert api.calls == []  # refused before asking Stripe anything


async def test_a_missing_signature_is_refused(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    response = await post(ingest, session_completed(), {"Content-Type": "application/json"})
    assert response.status_code == 400
    assert await ingest.published(topics.PAYMENTS) == []


async def test_an_expired_signature_is_refused(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    payload = session_completed()
    stale = int(time.time()) - SETTINGS.stripe_webhook_tolerance_seconds - 30
    response = await post(ingest, payload, signed(payload, timestamp=stale))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-expired")
    assert await ingest.published(topics.PAYMENTS) == []
    assert api.calls == []


async def test_a_signature_from_the_future_beyond_the_tolerance_is_refused(ingest: Ingest) -> None:
    payload = session_completed()
    ahead = int(time.time()) + SETTINGS.stripe_webhook_tolerance_seconds + 30
    response = await post(ingest, payload, signed(payload, timestamp=ahead))
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-expired")


async def test_a_tampered_body_is_refused(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    api.session("cs_2", amount=9_999_999)
    payload = session_completed()
    headers = signed(payload)
    tampered = payload.replace('"cs_1"', '"cs_2"')
    response = await post(ingest, tampered, headers)
    assert response.status_code == 400
    assert response.json()["type"].endswith("/webhook-signature-invalid")
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_replayed_event_is_refused_with_409_and_published_once(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    payload = session_completed()
    headers = signed(payload)
    assert (await post(ingest, payload, headers)).status_code == 200
    again = await post(ingest, payload, headers)
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")
    assert again.json()["type"].endswith("/webhook-replayed")
    # Re-signed now (a fresh timestamp) is still the same event id: still a replay.
    assert (await post(ingest, payload, signed(payload))).status_code == 409
    assert len(await ingest.published(topics.PAYMENTS)) == 1
    assert len(api.calls) == 1  # replays never reach Stripe's API


async def test_when_stripe_says_not_paid_nothing_is_published_and_a_retry_rechecks(ingest: Ingest,
                                                                                  api: FakeStripeApi) -> None:
    api.session(paid=False)
    payload = session_completed()  # the body claims "paid"; Stripe's API is the truth
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 422
    assert response.json()["type"].endswith("/payment-not-confirmed")
    assert await ingest.published(topics.PAYMENTS) == []
    # Not recorded as processed: when Stripe retries after the payment settled, it is credited.
    api.session(paid=True)
    retry = await post(ingest, payload, signed(payload))
    assert retry.status_code == 200, retry.text
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_an_object_stripe_does_not_know_is_not_confirmed(ingest: Ingest, api: FakeStripeApi) -> None:
    payload = session_completed("cs_unknown")
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 422
    assert await ingest.published(topics.PAYMENTS) == []


async def test_stripe_api_down_answers_502_and_the_retry_succeeds(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    api.down = True
    payload = session_completed()
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 502
    assert await ingest.published(topics.PAYMENTS) == []
    api.down = False
    assert (await post(ingest, payload, signed(payload))).status_code == 200
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_a_paid_session_without_tenant_metadata_is_unattributable(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session(metadata={"order_id": "order-42"})
    payload = session_completed()
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 422
    assert response.json()["type"].endswith("/payment-unattributable")
    assert await ingest.published(topics.PAYMENTS) == []


async def test_two_events_for_one_payment_publish_one_notification(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session()
    api.intent(metadata={"tenant": TENANT, "order_id": "order-42"})
    first = session_completed()
    second = event("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"}, "evt_2")
    assert (await post(ingest, first, signed(first))).json()["status"] == "published"
    response = await post(ingest, second, signed(second))
    assert response.status_code == 200
    assert response.json()["status"] == "already_notified"
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_a_dunning_charge_names_the_invoice_it_pays(ingest: Ingest, api: FakeStripeApi) -> None:
    invoice = "0b5c2f3e-9c1d-5e4f-8a7b-6c5d4e3f2a1b"
    api.intent(amount=3000, metadata={"tenant": TENANT, "order_id": invoice, "invoice_id": invoice})
    payload = event("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"})
    assert (await post(ingest, payload, signed(payload))).json()["status"] == "published"
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["invoice_id"], payment["order_id"], Decimal(payment["amount"])) == (invoice, invoice,
                                                                                       Decimal("30.00"))


async def test_a_failed_dunning_charge_publishes_a_payment_failed_naming_its_invoice(ingest: Ingest,
                                                                                    api: FakeStripeApi) -> None:
    invoice = "0b5c2f3e-9c1d-5e4f-8a7b-6c5d4e3f2a1b"
    api.intent(status="processing", amount=3000,
               metadata={"tenant": TENANT, "order_id": invoice, "invoice_id": invoice})
    api.objects["/v1/payment_intents/pi_1"]["amount"] = 3000
    payload = event("payment_intent.payment_failed", {"id": "pi_1", "object": "payment_intent"})
    assert (await post(ingest, payload, signed(payload))).status_code == 422  # Stripe says it is still processing
    api.objects["/v1/payment_intents/pi_1"]["status"] = "requires_payment_method"
    assert (await post(ingest, payload, signed(payload))).json()["status"] == "published"
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["invoice_id"], payment["gateway_reference"], Decimal(payment["amount"])) == (
        "payment_failed", invoice, "pi_1", Decimal("30.00"))

    # A failed intent that pays no invoice (auto-top-up sees its own declines): nothing published.
    api.intent("pi_2", status="requires_payment_method", metadata={"tenant": TENANT, "order_id": "order-42"})
    other = event("payment_intent.payment_failed", {"id": "pi_2", "object": "payment_intent"}, "evt_2")
    assert (await post(ingest, other, signed(other))).json()["status"] == "ignored"
    assert len(await ingest.published(topics.PAYMENTS)) == 1


async def test_a_payment_intent_without_billing_metadata_is_ignored(ingest: Ingest, api: FakeStripeApi) -> None:
    api.intent()
    payload = event("payment_intent.succeeded", {"id": "pi_1", "object": "payment_intent"})
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 200
    assert response.json()["status"] == "ignored"
    assert await ingest.published(topics.PAYMENTS) == []


async def test_a_succeeded_refund_is_attributed_through_its_checkout_session(ingest: Ingest,
                                                                           api: FakeStripeApi) -> None:
    api.session()
    api.intent()  # created by Checkout: no metadata of its own
    api.refund(amount=1050)
    payload = event("refund.created", {"id": "re_1", "object": "refund"})
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 200, response.text
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["order_id"], payment["gateway_reference"]) == ("refund_succeeded",
                                                                                    "order-42", "re_1")
    assert Decimal(payment["amount"]) == Decimal("10.50")


async def test_a_refund_of_a_dunning_charge_names_the_invoice_it_paid(ingest: Ingest, api: FakeStripeApi) -> None:
    invoice = "0b5c2f3e-9c1d-5e4f-8a7b-6c5d4e3f2a1b"
    api.intent(amount=3000, metadata={"tenant": TENANT, "order_id": invoice, "invoice_id": invoice})
    api.refund(amount=1000)  # made in Stripe's dashboard: no metadata of its own
    payload = event("refund.created", {"id": "re_1", "object": "refund"})
    assert (await post(ingest, payload, signed(payload))).json()["status"] == "published"
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["kind"], payment["invoice_id"], Decimal(payment["amount"])) == ("refund_succeeded", invoice,
                                                                                    Decimal("10.00"))
    # The payment it gave back (the ledger credits the invoice only for the payment that paid it).
    assert (payment["gateway_reference"], payment["refunded_payment"]) == ("re_1", "pi_1")


async def test_a_pending_refund_is_not_confirmed(ingest: Ingest, api: FakeStripeApi) -> None:
    api.intent(metadata={"tenant": TENANT, "order_id": "order-42"})
    api.refund(status="pending")
    payload = event("refund.created", {"id": "re_1", "object": "refund"})
    assert (await post(ingest, payload, signed(payload))).status_code == 422
    assert await ingest.published(topics.PAYMENTS) == []


async def test_zero_decimal_currency_amounts_are_exact(ingest: Ingest, api: FakeStripeApi) -> None:
    api.session(amount=500, currency="jpy")
    payload = session_completed()
    assert (await post(ingest, payload, signed(payload))).status_code == 200
    [payment] = await ingest.published(topics.PAYMENTS)
    assert (payment["amount"], payment["currency"]) == ("500", "JPY")


async def test_other_event_types_are_acknowledged_once_and_publish_nothing(ingest: Ingest,
                                                                          api: FakeStripeApi) -> None:
    payload = event("customer.created", {"id": "cus_1", "object": "customer"})
    response = await post(ingest, payload, signed(payload))
    assert (response.status_code, response.json()["status"]) == (200, "ignored")
    assert (await post(ingest, payload, signed(payload))).status_code == 409
    assert await ingest.published(topics.PAYMENTS) == []
    assert api.calls == []


async def test_unknown_and_disabled_gateways_are_404_problems(ingest: Ingest) -> None:
    for name in ("nope", "razorpay"):  # razorpay exists but is not enabled here
        response = await ingest.http.post(f"/v1/webhooks/{name}", content=b"{}")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["type"].endswith("/unknown-gateway")


async def test_an_oversized_body_is_refused_before_verification(ingest: Ingest) -> None:
    body = b"x" * (SETTINGS.webhook_body_bytes_max + 1)
    response = await ingest.http.post("/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": "t=1"})
    assert response.status_code == 413
    # As the app's own body limit answers: problem+json, and the connection closes after it.
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["connection"] == "close"
    assert response.json()["type"] == "https://billing.dev/problems/payload-too-large"


# -- saved cards: Stripe's account updater ---------------------------------------------------------------------


def method_updated(event_type: str = "payment_method.automatically_updated", event_id: str = "evt_pm_1") -> str:
    # The body's card is never trusted either: the re-fetched PaymentMethod's is published.
    return event(event_type, {"id": "pm_1", "object": "payment_method", "type": "card",
                              "card": {"exp_month": 1, "exp_year": 2099}}, event_id)


async def test_a_card_renewed_by_the_account_updater_becomes_one_ledger_command(
        ingest: Ingest, api: FakeStripeApi, tmp_path: Path) -> None:
    from billing_ledger.application import LedgerApplication, persistence_env
    from billing_ledger.domain.roster import roster_id

    api.customer()  # the customer's metadata.tenant names the billing account
    api.card_method(exp_month=4, exp_year=2031)
    payload = method_updated()
    response = await post(ingest, payload, signed(payload))
    assert (response.status_code, response.json()["status"]) == (200, "published"), response.text
    [(key, published)] = await ingest.published_with_keys(topics.LEDGER_COMMANDS)
    assert key == str(ids.account_id(TENANT))
    command = LedgerCommand.model_validate(published)
    assert (command.kind, command.tenant, command.command_id) == (
        "payment_method.card_update", TENANT, ids.command_id("payment_method.card_update", "stripe", "evt_pm_1"))
    assert command.payload == {"gateway": "stripe", "method_id": "pm_1", "card": {
        "brand": "visa", "last4": "4242", "exp_month": 4, "exp_year": 2031}}
    assert api.calls == [("get", "/v1/payment_methods/pm_1?expand[0]=customer")]
    assert await ingest.published(topics.PAYMENTS) == []  # no money moved
    assert (await post(ingest, payload, signed(payload))).status_code == 409  # a redelivery: nothing more

    # The ledger applies it: the saved card now expires in April 2031; a second delivery changes nothing.
    ledger = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    try:
        for kind, payload_ in (("account.open", {"currency": "USD"}), ("payment_method.add", {
                "method_id": "pm_1", "gateway": "stripe",
                "card": {"brand": "visa", "last4": "4242", "exp_month": 3, "exp_year": 2026}})):
            [result] = ledger.apply_commands([command.model_copy(update={
                "command_id": ids.command_id(kind, TENANT), "kind": kind, "payload": payload_})])
            assert result.outcome == "applied", result
        assert [r.outcome for r in ledger.apply_commands([command, command])] == ["applied", "duplicate"]
        assert ledger.read(roster_id(TENANT), lambda r: r.payment_methods[0]["card"]) == {
            "brand": "visa", "last4": "4242", "exp_month": 4, "exp_year": 2031}
    finally:
        ledger.close()


@pytest.mark.parametrize("case", ["no tenant", "not a card"])
async def test_a_method_update_ingest_cannot_map_is_acknowledged_and_publishes_nothing(
        ingest: Ingest, api: FakeStripeApi, case: str) -> None:
    api.customer(metadata={})
    api.card_method(kind="sepa_debit" if case == "not a card" else "card",
                    metadata={"tenant": TENANT} if case == "not a card" else None)
    payload = method_updated("payment_method.updated")
    response = await post(ingest, payload, signed(payload))
    assert (response.status_code, response.json()["status"]) == (200, "ignored"), response.text
    assert await ingest.published(topics.LEDGER_COMMANDS) == []


# -- events about a customer: attributed by the customer's metadata.tenant (since session 15) ---------------------


def source_updated(event_id: str = "evt_src_1") -> str:
    # The body's card is never trusted: the re-fetched one is published.
    return event("customer.source.updated", {"id": "card_1", "object": "card", "customer": "cus_1",
                                             "exp_month": 1, "exp_year": 2099}, event_id)


def customer_deleted(metadata: dict[str, str] | None = None, event_id: str = "evt_cus_del") -> str:
    return event("customer.deleted", {"id": "cus_1", "object": "customer",
                                      "metadata": {"tenant": TENANT} if metadata is None else metadata}, event_id)


async def test_a_card_source_renewed_by_the_account_updater_reaches_the_tenant_its_customer_names(
        ingest: Ingest, api: FakeStripeApi) -> None:
    """A card saved as a source of a customer (the Cards API) is renewed with ``customer.source.updated``, an event
    about the customer: ingest ignored every customer event (only PaymentMethods were attributed)."""
    api.customer()  # marked by the ledger: metadata.tenant
    api.source_card(exp_month=9, exp_year=2032)  # the card itself carries no mark
    payload = source_updated()
    response = await post(ingest, payload, signed(payload))
    assert (response.status_code, response.json()["status"]) == (200, "published"), response.text
    [(key, published)] = await ingest.published_with_keys(topics.LEDGER_COMMANDS)
    assert key == str(ids.account_id(TENANT))
    command = LedgerCommand.model_validate(published)
    assert (command.kind, command.tenant, command.command_id) == (
        "payment_method.card_update", TENANT, ids.command_id("payment_method.card_update", "stripe", "evt_src_1"))
    assert command.payload == {"gateway": "stripe", "method_id": "card_1", "card": {
        "brand": "visa", "last4": "1881", "exp_month": 9, "exp_year": 2032}}
    assert api.calls == [("get", "/v1/customers/cus_1/sources/card_1"), ("get", "/v1/customers/cus_1")]
    assert (await post(ingest, payload, signed(payload))).status_code == 409  # a redelivery: nothing more


@pytest.mark.parametrize(("customer_mark", "card_mark", "published_for"), [
    ({}, {"tenant": TENANT}, TENANT),  # a customer not marked yet: the card's own mark, as for a PaymentMethod
    ({"tenant": TENANT}, {"tenant": "other"}, TENANT),  # an event about the customer: the customer's mark first
    ({}, {}, None),  # no mark anywhere: ignored
])
async def test_a_card_source_update_is_attributed_by_its_customer_then_by_the_card(
        ingest: Ingest, api: FakeStripeApi, customer_mark: dict[str, str], card_mark: dict[str, str],
        published_for: str | None) -> None:
    api.customer(metadata=customer_mark)
    api.source_card(metadata=card_mark)
    payload = source_updated()
    response = await post(ingest, payload, signed(payload))
    assert response.status_code == 200, response.text
    commands = [LedgerCommand.model_validate(c) for c in await ingest.published(topics.LEDGER_COMMANDS)]
    assert [c.tenant for c in commands] == ([published_for] if published_for else [])
    assert response.json()["status"] == ("published" if published_for else "ignored")


async def test_a_deleted_customer_becomes_one_ledger_command_that_forgets_it_and_its_methods(
        ingest: Ingest, api: FakeStripeApi, tmp_path: Path) -> None:
    from billing_ledger.application import LedgerApplication, persistence_env
    from billing_ledger.domain.payment_profile import payment_profile_id
    from billing_ledger.domain.roster import roster_id

    api.deleted_customer()  # the API keeps only that it is deleted; the signed event carries its metadata
    payload = customer_deleted()
    response = await post(ingest, payload, signed(payload))
    assert (response.status_code, response.json()["status"]) == (200, "published"), response.text
    [(key, published)] = await ingest.published_with_keys(topics.LEDGER_COMMANDS)
    assert key == str(ids.account_id(TENANT))
    command = LedgerCommand.model_validate(published)
    assert (command.kind, command.tenant, command.payload) == (
        "payment_customer.deleted", TENANT, {"gateway": "stripe", "customer": "cus_1"})
    assert api.calls == [("get", "/v1/customers/cus_1")]
    assert await ingest.published(topics.PAYMENTS) == []  # no money moved

    # The ledger forgets the customer and the Stripe methods it detached; a PayPal method stays.
    ledger = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    try:
        for kind, payload_ in (("account.open", {"currency": "USD"}),
                               ("payment_customer.set", {"gateway": "stripe", "customer": "cus_1"}),
                               ("payment_method.add", {"method_id": "pm_1", "gateway": "stripe"}),
                               ("payment_method.add", {"method_id": "card_1", "gateway": "stripe"}),
                               ("payment_method.add", {"method_id": "pp_1", "gateway": "paypal"})):
            [result] = ledger.apply_commands([command.model_copy(update={
                "command_id": ids.command_id(kind, TENANT, str(payload_)), "kind": kind, "payload": payload_})])
            assert result.outcome == "applied", result
        [applied, again] = ledger.apply_commands([command, command])
        assert (applied.outcome, again.outcome) == ("applied", "duplicate"), applied
        assert applied.value["payment_methods_removed"] == ["pm_1", "card_1"]
        assert ledger.read(roster_id(TENANT), lambda r: [m["method_id"] for m in r.payment_methods]) == ["pp_1"]
        assert ledger.read(payment_profile_id(TENANT), lambda p: dict(p.customers)) == {}
        # Another deletion of a customer the account does not name (any more) changes nothing, recorded.
        [other] = ledger.apply_commands([command.model_copy(update={"command_id": ids.command_id("x", "cus_2")})])
        assert (other.outcome, other.reason) == ("rejected", "unknown_payment_customer")
    finally:
        ledger.close()


@pytest.mark.parametrize("case", ["not deleted", "no tenant"])
async def test_a_customer_deletion_stripe_does_not_confirm_or_of_no_tenant_publishes_nothing(
        ingest: Ingest, api: FakeStripeApi, case: str) -> None:
    if case == "not deleted":
        api.customer()  # the body says deleted; Stripe's API says it is not: never trusted
    else:
        api.deleted_customer()
    payload = customer_deleted(metadata={} if case == "no tenant" else None)
    response = await post(ingest, payload, signed(payload))
    expected = (422, "payment-not-confirmed") if case == "not deleted" else (200, None)
    assert (response.status_code, response.json().get("type", "").rsplit("/", 1)[-1] or None) == expected, response.text
    assert await ingest.published(topics.LEDGER_COMMANDS) == []
