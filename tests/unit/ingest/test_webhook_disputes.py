"""Dispute (chargeback) webhooks of the three gateways through ``POST /v1/webhooks/{gateway}``: real-shaped event
bodies, each dispute re-fetched from the gateway's (offline, faked) API, one ``PaymentNotification`` per movement of
a dispute on ``billing.payments`` with deterministic references, so a redelivered webhook is a replay and a second
event of the same movement publishes nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events import ids, topics
from billing_events.messages import PaymentNotification
from billing_ingest.webhooks import paypal, razorpay
from billing_ingest.webhooks import stripe as stripe_gateway

from tests.unit.ingest.harness import TENANT, Ingest
from tests.unit.ingest.test_webhooks_paypal import SETTINGS as PAYPAL_SETTINGS
from tests.unit.ingest.test_webhooks_paypal import FakePayPalApi, transmission
from tests.unit.ingest.test_webhooks_razorpay import NOTES, FakeRazorpayApi
from tests.unit.ingest.test_webhooks_razorpay import SETTINGS as RAZORPAY_SETTINGS
from tests.unit.ingest.test_webhooks_razorpay import signed as razorpay_signed
from tests.unit.ingest.test_webhooks_stripe import SETTINGS as STRIPE_SETTINGS
from tests.unit.ingest.test_webhooks_stripe import FakeStripeApi, signed

# -- Stripe -------------------------------------------------------------------------------------------------------


def stripe_dispute(status: str = "needs_response", *, withdrawn: bool = True, reinstated: bool = False,
                   amount: int = 11900, fee_returned: bool = False) -> dict[str, Any]:
    """A dispute as Stripe's API answers it (``GET /v1/disputes/{id}``): funds are withdrawn when it is created
    (a balance transaction of -amount with the 15.00 dispute fee) and reinstated when it is won (with the fee given
    back, ``fee_returned``, where Stripe returns it)."""
    transactions = []
    if withdrawn:
        transactions.append({"id": "txn_withdrawn", "object": "balance_transaction", "amount": -amount,
                             "currency": "usd", "fee": 1500, "net": -amount - 1500, "reporting_category": "dispute",
                             "type": "adjustment", "status": "available"})
    if reinstated:
        fee = -1500 if fee_returned else 0
        transactions.append({"id": "txn_reinstated", "object": "balance_transaction", "amount": amount,
                             "currency": "usd", "fee": fee, "net": amount - fee, "reporting_category": "dispute_reversal",
                             "type": "adjustment", "status": "pending"})
    return {"id": "dp_1", "object": "dispute", "amount": amount, "currency": "usd", "charge": "ch_1",
            "payment_intent": "pi_1", "status": status, "reason": "fraudulent", "is_charge_refundable": False,
            "livemode": False, "metadata": {}, "created": int(time.time()), "balance_transactions": transactions,
            "evidence_details": {"due_by": int(time.time()) + 7 * 86400, "has_evidence": False, "past_due": False,
                                 "submission_count": 0}}


def stripe_event(event_type: str, dispute: dict[str, Any], event_id: str) -> str:
    return json.dumps({"id": event_id, "object": "event", "api_version": "2024-06-20", "type": event_type,
                       "livemode": False, "created": int(time.time()), "data": {"object": dispute}})


@pytest.fixture
def stripe_api() -> FakeStripeApi:
    api = FakeStripeApi()
    api.intent("pi_1", amount=11900, metadata={"tenant": TENANT, "order_id": "order-42"})
    return api


@pytest.fixture
async def stripe_ingest(tmp_path: Path, stripe_api: FakeStripeApi) -> AsyncIterator[Ingest]:
    gateway = stripe_gateway.build(STRIPE_SETTINGS, http_client=stripe_api)
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"stripe": gateway}).start()
    yield ingest
    await ingest.stop()


async def send_stripe(ingest: Ingest, api: FakeStripeApi, event_type: str, event_id: str, **state: Any) -> Any:
    api.objects["/v1/disputes/dp_1"] = stripe_dispute(**state)
    # The body carries the dispute as it was when the event happened; only the API's answer counts.
    body = stripe_event(event_type, stripe_dispute(), event_id)
    return await ingest.http.post("/v1/webhooks/stripe", content=body.encode(), headers=signed(body))


async def test_each_stripe_dispute_movement_is_published_once_with_its_dispute_payment_and_outcome(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi) -> None:
    steps = [("charge.dispute.created", "evt_created", {}),
             ("charge.dispute.funds_withdrawn", "evt_withdrawn", {}),
             ("charge.dispute.closed", "evt_closed", {"status": "lost"})]
    for event_type, event_id, state in steps:
        response = await send_stripe(stripe_ingest, stripe_api, event_type, event_id, **state)
        assert (response.status_code, response.json()["status"]) == (200, "published"), response.text
    published = await stripe_ingest.published_with_keys(topics.PAYMENTS)
    assert {key for key, _ in published} == {str(ids.account_id(TENANT))}
    seen = [PaymentNotification.model_validate(message) for _, message in published]
    assert [(n.kind, n.gateway_reference, n.dispute_outcome) for n in seen] == [
        ("dispute_opened", "dp_1", None), ("dispute_funds_withdrawn", "txn_withdrawn", None),
        ("dispute_closed", "dp_1/lost", "lost")]
    assert {(n.dispute, n.disputed_payment, n.order_id, n.amount, n.currency) for n in seen} == {
        ("dp_1", "pi_1", "order-42", Decimal("119.00"), "USD")}
    assert ("get", "/v1/disputes/dp_1?expand[0]=payment_intent") in stripe_api.calls


async def test_a_redelivered_stripe_dispute_event_is_a_replay_and_another_event_of_the_outcome_publishes_nothing(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi) -> None:
    first = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.closed", "evt_closed", status="lost")
    assert first.status_code == 200
    again = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.closed", "evt_closed", status="lost")
    assert (again.status_code, again.json()["type"].rsplit("/", 1)[-1]) == (409, "webhook-replayed")
    other = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.closed", "evt_closed_2", status="lost")
    assert other.json()["status"] == "already_notified"
    assert len(await stripe_ingest.published(topics.PAYMENTS)) == 1


async def test_each_stripe_dispute_movement_carries_the_fee_its_balance_transactions_show(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi) -> None:
    """Stripe's 15.00 dispute fee is in the withdrawal's balance transaction; on a won dispute (some regions) the
    reinstatement's gives it back: the notifications carry the fee so far, net, as the API shows it then."""
    steps = [("charge.dispute.created", "evt_created", {"withdrawn": False}),
             ("charge.dispute.funds_withdrawn", "evt_withdrawn", {}),
             ("charge.dispute.funds_reinstated", "evt_reinstated", {"reinstated": True, "fee_returned": True}),
             ("charge.dispute.closed", "evt_closed", {"status": "won", "reinstated": True, "fee_returned": True})]
    for event_type, event_id, state in steps:
        response = await send_stripe(stripe_ingest, stripe_api, event_type, event_id, **state)
        assert response.status_code == 200, response.text
    seen = [PaymentNotification.model_validate(m) for m in await stripe_ingest.published(topics.PAYMENTS)]
    assert [(n.kind, n.dispute_fee, n.dispute_fee_currency) for n in seen] == [
        ("dispute_opened", None, None), ("dispute_funds_withdrawn", Decimal("15.00"), "USD"),
        ("dispute_funds_reinstated", Decimal("0.00"), "USD"), ("dispute_closed", Decimal("0.00"), "USD")]


@pytest.mark.parametrize(("status", "outcome"), [("won", "won"), ("warning_closed", "closed")])
async def test_a_stripe_dispute_closed_without_a_chargeback_is_published_with_its_outcome(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi, status: str, outcome: str) -> None:
    response = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.closed", "evt_closed", status=status,
                                 withdrawn=status == "won", reinstated=status == "won")
    assert response.status_code == 200, response.text
    [message] = await stripe_ingest.published(topics.PAYMENTS)
    assert (message["kind"], message["dispute_outcome"], message["gateway_reference"]) == (
        "dispute_closed", outcome, f"dp_1/{outcome}")


async def test_stripe_dispute_events_the_api_does_not_bear_out_are_not_confirmed_and_publish_nothing(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi) -> None:
    still_open = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.closed", "evt_c", status="under_review")
    no_withdrawal = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.funds_withdrawn", "evt_w",
                                      withdrawn=False)
    no_reinstatement = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.funds_reinstated", "evt_r")
    for response in (still_open, no_withdrawal, no_reinstatement):
        assert response.status_code == 422, response.text
        assert response.json()["type"].endswith("/payment-not-confirmed")
    assert await stripe_ingest.published(topics.PAYMENTS) == []


async def test_a_stripe_dispute_is_attributed_by_its_checkout_session_and_names_a_dunning_invoice(
        stripe_ingest: Ingest, stripe_api: FakeStripeApi) -> None:
    stripe_api.intent("pi_1", amount=11900, metadata={})  # what Checkout creates: the metadata is on the session
    stripe_api.session("cs_1", intent="pi_1", amount=11900)
    response = await send_stripe(stripe_ingest, stripe_api, "charge.dispute.created", "evt_created")
    assert response.status_code == 200, response.text
    # A dunning charge names the invoice it paid: so does the notification of its dispute.
    stripe_api.intent("pi_1", amount=11900, metadata={"tenant": TENANT, "order_id": "inv-1", "invoice_id": "inv-1"})
    body = stripe_event("charge.dispute.closed", {**stripe_dispute(), "id": "dp_2"}, "evt_dp2")
    stripe_api.objects["/v1/disputes/dp_2"] = {**stripe_dispute("lost"), "id": "dp_2"}
    assert (await stripe_ingest.http.post("/v1/webhooks/stripe", content=body.encode(),
                                          headers=signed(body))).status_code == 200
    opened, closed = await stripe_ingest.published(topics.PAYMENTS)
    assert (opened["order_id"], opened["invoice_id"]) == ("order-42", None)
    assert (closed["dispute"], closed["invoice_id"], closed["disputed_payment"]) == ("dp_2", "inv-1", "pi_1")


# -- Razorpay -----------------------------------------------------------------------------------------------------


def razorpay_dispute(status: str = "open", deducted: int = 0) -> dict[str, Any]:
    """A dispute as Razorpay's API answers it (``GET /v1/disputes/{id}``, the Disputes entity)."""
    return {"id": "disp_1", "entity": "dispute", "payment_id": "pay_1", "amount": 49900, "currency": "INR",
            "amount_deducted": deducted, "reason_code": "chargeback", "reason_description": "Customer disputed",
            "respond_by": int(time.time()) + 7 * 86400, "status": status, "phase": "chargeback",
            "created_at": int(time.time())}


def razorpay_event(name: str) -> bytes:
    return json.dumps({"entity": "event", "account_id": "acc_1", "event": name, "contains": ["payment", "dispute"],
                       "payload": {"payment": {"entity": {"id": "pay_1", "entity": "payment", "amount": 49900,
                                                          "currency": "INR", "status": "captured"}},
                                   "dispute": {"entity": razorpay_dispute()}},
                       "created_at": int(time.time())}).encode()


@pytest.fixture
def razorpay_api() -> FakeRazorpayApi:
    api = FakeRazorpayApi()
    api.payment()
    return api


@pytest.fixture
async def razorpay_ingest(tmp_path: Path, razorpay_api: FakeRazorpayApi) -> AsyncIterator[Ingest]:
    gateway = razorpay.build(RAZORPAY_SETTINGS, transport=httpx.MockTransport(razorpay_api))
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"razorpay": gateway}).start()
    yield ingest
    await ingest.stop()


async def send_razorpay(ingest: Ingest, api: FakeRazorpayApi, name: str, event_id: str, **state: Any) -> Any:
    api.objects["/v1/disputes/disp_1"] = razorpay_dispute(**state)
    body = razorpay_event(name)
    return await ingest.http.post("/v1/webhooks/razorpay", content=body, headers=razorpay_signed(body, event_id=event_id))


async def test_razorpay_disputes_are_published_opened_and_lost_with_the_amount_deducted(
        razorpay_ingest: Ingest, razorpay_api: FakeRazorpayApi) -> None:
    opened = await send_razorpay(razorpay_ingest, razorpay_api, "payment.dispute.created", "evt_1")
    review = await send_razorpay(razorpay_ingest, razorpay_api, "payment.dispute.under_review", "evt_2",
                                 status="under_review")
    lost = await send_razorpay(razorpay_ingest, razorpay_api, "payment.dispute.lost", "evt_3", status="lost",
                               deducted=49900)
    assert [r.json()["status"] for r in (opened, review, lost)] == ["published", "ignored", "published"]
    first, last = await razorpay_ingest.published(topics.PAYMENTS)
    assert (first["kind"], first["gateway_reference"], first["order_id"]) == ("dispute_opened", "disp_1",
                                                                              NOTES["order_id"])
    assert (last["kind"], last["dispute_outcome"], last["gateway_reference"]) == ("dispute_closed", "lost",
                                                                                  "disp_1/lost")
    assert (Decimal(last["amount"]), last["currency"], last["disputed_payment"]) == (Decimal("499.00"), "INR",
                                                                                     "pay_1")


async def test_a_razorpay_dispute_event_its_status_does_not_bear_out_is_not_confirmed(
        razorpay_ingest: Ingest, razorpay_api: FakeRazorpayApi) -> None:
    response = await send_razorpay(razorpay_ingest, razorpay_api, "payment.dispute.lost", "evt_1",
                                   status="under_review")
    assert response.status_code == 422
    assert await razorpay_ingest.published(topics.PAYMENTS) == []


# -- PayPal -------------------------------------------------------------------------------------------------------


class FakePayPalDisputes(FakePayPalApi):
    """PayPal's API with ``GET /v1/customer/disputes/{id}``."""

    def __init__(self) -> None:
        super().__init__()
        self.disputes: dict[str, dict[str, Any]] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/customer/disputes/"):
            self.calls.append(f"{request.method} {request.url.path}")
            found = self.disputes.get(request.url.path.rsplit("/", 1)[-1])
            return httpx.Response(200, json=found) if found else httpx.Response(404, json={"name": "NOT_FOUND"})
        return super().__call__(request)

    def dispute(self, status: str = "WAITING_FOR_SELLER_RESPONSE", outcome: str | None = None,
                refunded: str | None = None, fees: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        """``fees``: the seller's fee money movements, (type DEBIT or CREDIT, value in EUR)."""
        self.disputes["PP-D-1234"] = {
            "dispute_id": "PP-D-1234", "create_time": "2026-11-20T10:00:00.000Z", "reason": "UNAUTHORISED",
            "status": status, "dispute_amount": {"currency_code": "EUR", "value": "12.34"},
            "disputed_transactions": [{"seller_transaction_id": "CAP-1", "buyer_transaction_id": "4EX11",
                                       "seller": {"merchant_id": "MERCH1"}}],
            "dispute_life_cycle_stage": "CHARGEBACK", "dispute_channel": "EXTERNAL",
            "money_movements": [{"affected_party": "SELLER", "amount": {"currency_code": "EUR", "value": value},
                                 "initiated_time": "2026-11-21T10:00:00.000Z", "type": kind, "reason": "CHARGEBACK_FEE"}
                                for kind, value in fees],
            **({"dispute_outcome": {"outcome_code": outcome,
                                    **({"amount_refunded": {"currency_code": "EUR", "value": refunded}}
                                       if refunded else {})}} if outcome else {})}


def paypal_event(event_type: str, event_id: str) -> bytes:
    return json.dumps({"id": event_id, "event_version": "1.0", "create_time": "2026-11-21T10:00:00.000Z",
                       "resource_type": "dispute", "event_type": event_type, "summary": "A dispute was resolved",
                       "resource": {"dispute_id": "PP-D-1234", "status": "RESOLVED",
                                    "dispute_amount": {"currency_code": "EUR", "value": "99999.00"}}}).encode()


@pytest.fixture
def paypal_api() -> FakePayPalDisputes:
    api = FakePayPalDisputes()
    api.capture()
    return api


@pytest.fixture
async def paypal_ingest(tmp_path: Path, paypal_api: FakePayPalDisputes) -> AsyncIterator[Ingest]:
    gateway = paypal.build(PAYPAL_SETTINGS, transport=httpx.MockTransport(paypal_api))
    assert gateway is not None
    ingest = await Ingest(tmp_path, {"paypal": gateway}).start()
    yield ingest
    await ingest.stop()


@pytest.mark.parametrize(("code", "outcome"), [("RESOLVED_BUYER_FAVOUR", "lost"), ("RESOLVED_SELLER_FAVOUR", "won"),
                                               ("CANCELED_BY_BUYER", "closed")])
async def test_a_paypal_dispute_is_attributed_by_its_capture_and_published_with_its_outcome(
        paypal_ingest: Ingest, paypal_api: FakePayPalDisputes, code: str, outcome: str) -> None:
    paypal_api.dispute()
    created = await paypal_ingest.http.post("/v1/webhooks/paypal", headers=transmission(),
                                            content=paypal_event("CUSTOMER.DISPUTE.CREATED", "WH-D-1"))
    paypal_api.dispute("RESOLVED", code, refunded="10.00" if outcome == "lost" else None)
    resolved = await paypal_ingest.http.post("/v1/webhooks/paypal", headers=transmission(),
                                             content=paypal_event("CUSTOMER.DISPUTE.RESOLVED", "WH-D-2"))
    assert [r.json()["status"] for r in (created, resolved)] == ["published", "published"], resolved.text
    opened, closed = await paypal_ingest.published(topics.PAYMENTS)
    assert (opened["kind"], opened["tenant"], opened["order_id"], opened["disputed_payment"]) == (
        "dispute_opened", TENANT, "order-9", "CAP-1")
    assert (closed["kind"], closed["dispute_outcome"], closed["gateway_reference"]) == (
        "dispute_closed", outcome, f"PP-D-1234/{outcome}")
    # The API's amounts, never the body's: a lost dispute's refunded amount, else the dispute's.
    assert Decimal(closed["amount"]) == (Decimal("10.00") if outcome == "lost" else Decimal("12.34"))
    assert "GET /v1/customer/disputes/PP-D-1234" in paypal_api.calls


async def test_a_paypal_dispute_not_resolved_yet_is_not_confirmed(paypal_ingest: Ingest,
                                                                  paypal_api: FakePayPalDisputes) -> None:
    paypal_api.dispute("UNDER_REVIEW")
    response = await paypal_ingest.http.post("/v1/webhooks/paypal", headers=transmission(),
                                             content=paypal_event("CUSTOMER.DISPUTE.RESOLVED", "WH-D-3"))
    assert response.status_code == 422
    assert await paypal_ingest.published(topics.PAYMENTS) == []


async def test_a_paypal_dispute_carries_the_chargeback_fees_paypal_charged_the_seller(
        paypal_ingest: Ingest, paypal_api: FakePayPalDisputes) -> None:
    paypal_api.dispute("RESOLVED", "RESOLVED_BUYER_FAVOUR", refunded="12.34", fees=[("DEBIT", "20.00")])
    lost = await paypal_ingest.http.post("/v1/webhooks/paypal", headers=transmission(),
                                         content=paypal_event("CUSTOMER.DISPUTE.RESOLVED", "WH-D-4"))
    assert lost.status_code == 200, lost.text
    paypal_api.dispute("RESOLVED", "RESOLVED_SELLER_FAVOUR", fees=[("DEBIT", "20.00"), ("CREDIT", "20.00")])
    won = await paypal_ingest.http.post("/v1/webhooks/paypal", headers=transmission(),
                                        content=paypal_event("CUSTOMER.DISPUTE.RESOLVED", "WH-D-5"))
    assert won.status_code == 200, won.text
    first, second = await paypal_ingest.published(topics.PAYMENTS)
    assert (first["dispute_fee"], first["dispute_fee_currency"]) == ("20.00", "EUR")
    assert (Decimal(second["dispute_fee"]), second["dispute_fee_currency"]) == (Decimal(0), "EUR")


async def test_a_razorpay_dispute_states_no_fee(razorpay_ingest: Ingest, razorpay_api: FakeRazorpayApi) -> None:
    lost = await send_razorpay(razorpay_ingest, razorpay_api, "payment.dispute.lost", "evt_1", status="lost",
                               deducted=49900)
    assert lost.status_code == 200
    [message] = await razorpay_ingest.published(topics.PAYMENTS)
    assert message.get("dispute_fee") is None
