"""The Razorpay and PayPal outbound adapters against stand-ins for their APIs (``httpx.MockTransport``):
hosted checkout, refund, idempotency headers, exact minor units (each gateway's currency rules: thousandths ending
in 0 at Razorpay, no decimals for HUF/TWD at PayPal, PayPal's currencies only), a saved card's brand, last four
digits and expiry in each gateway's own shape, and errors as ``GatewayError``."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from billing_events.money import MoneyError
from billing_ledger.gateways import AmountNotChargeable, GatewayError, UnknownPaymentMethod, paypal, razorpay
from billing_ledger.gateways.registry import enabled_gateways
from billing_runtime.settings import Settings

RAZORPAY_BASE = "https://razorpay.api.test"
PAYPAL_BASE = "https://paypal.api.test"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class Api:
    """Records requests and answers with ``handler``."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.requests: list[httpx.Request] = []
        self._handler = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def body(request: httpx.Request) -> Any:
    return json.loads(request.content)


# -- Razorpay -------------------------------------------------------------------------------------------------


def razorpay_api(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/orders":
        return httpx.Response(200, json={"id": "order_RZP1", "entity": "order", "status": "created",
                                         "amount": body(request)["amount"]})
    if request.url.path.startswith("/v1/payments/") and request.url.path.endswith("/refund"):
        return httpx.Response(200, json={"id": "rfnd_RZP1", "entity": "refund", "status": "processed",
                                         "amount": body(request)["amount"]})
    if request.method == "GET" and request.url.path == "/v1/customers/cust_RZP1/tokens":
        # Razorpay's token entity (Customers API, "Fetch tokens by customer id"): the card's network, last4 and
        # expiry; the year may come with two digits.
        return httpx.Response(200, json={"entity": "collection", "count": 2, "items": [
            {"id": "token_CARD1", "entity": "token", "method": "card", "card": {
                "entity": "card", "name": "Gaurav Kumar", "last4": "8950", "network": "Visa", "type": "credit",
                "issuer": "STCB", "expiry_month": 12, "expiry_year": 27}},
            {"id": "token_UPI1", "entity": "token", "method": "upi", "card": None}]})
    return httpx.Response(404, json={"error": {"code": "BAD_REQUEST_ERROR"}})


def razorpay_gateway(api: Api) -> razorpay.RazorpayGateway:
    return razorpay.RazorpayGateway("rzp_test_key", "rzp_secret", RAZORPAY_BASE, 5, api.transport)


@pytest.mark.asyncio
async def test_razorpay_opens_an_order_for_hosted_checkout() -> None:
    api = Api(razorpay_api)
    session = await razorpay_gateway(api).open_checkout(
        order_id="5f0c6d1e-order", tenant="acme", description="Account top-up", total=Decimal("113.05"),
        currency_code="INR", success_url="https://app.test/ok?x=1", cancel_url="https://app.test/cancel")
    assert session.session_id == "order_RZP1"
    assert session.url == "https://app.test/ok?x=1&razorpay_order_id=order_RZP1&key_id=rzp_test_key"
    [request] = api.requests
    assert (request.method, str(request.url)) == ("POST", f"{RAZORPAY_BASE}/v1/orders")
    assert request.headers["Authorization"] == basic("rzp_test_key", "rzp_secret")
    assert request.headers["X-Idempotency-Key"] == "5f0c6d1e-order"
    assert body(request) == {"amount": 11305, "currency": "INR", "receipt": "5f0c6d1e-order",
                             "notes": {"tenant": "acme", "order_id": "5f0c6d1e-order"}}


@pytest.mark.asyncio
async def test_razorpay_refunds_in_minor_units_with_the_idempotency_key() -> None:
    api = Api(razorpay_api)
    result = await razorpay_gateway(api).refund(payment_reference="pay_ABC", total=Decimal(1000),
                                                currency_code="JPY", idempotency_key="refund-r1", tenant="acme",
                                                order_id="o-1")
    assert (result.reference, result.status) == ("rfnd_RZP1", "processed")
    [request] = api.requests
    assert request.url.path == "/v1/payments/pay_ABC/refund" and request.headers["X-Idempotency-Key"] == "refund-r1"
    assert body(request) == {"amount": 1000, "notes": {"tenant": "acme", "order_id": "o-1"}}  # JPY: no decimals


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", [
    lambda r: httpx.Response(502, text="bad gateway"),
    lambda r: httpx.Response(400, json={"error": {"code": "BAD_REQUEST_ERROR", "description": "invalid"}}),
    lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)),
])
async def test_razorpay_failures_are_gateway_errors(answer: Callable[[httpx.Request], httpx.Response]) -> None:
    gateway = razorpay_gateway(Api(answer))
    with pytest.raises(GatewayError):
        await gateway.refund(payment_reference="pay_ABC", total=Decimal(10), currency_code="INR",
                             idempotency_key="k", tenant="acme", order_id="o")


@pytest.mark.asyncio
async def test_razorpay_refuses_amounts_finer_than_the_currency_and_off_session_charges() -> None:
    api = Api(razorpay_api)
    gateway = razorpay_gateway(api)
    with pytest.raises(MoneyError):
        await gateway.open_checkout(order_id="o", tenant="acme", description="d", total=Decimal("10.001"),
                                    currency_code="INR", success_url="https://a/ok", cancel_url="https://a/no")
    charge = await gateway.charge_saved_method(customer=None, method_id="tok", total=Decimal(1),
                                               currency_code="INR", idempotency_key="k", tenant="acme", order_id="o")
    assert not charge.ok and "mandate" in (charge.error or "")
    assert api.requests == []  # nothing sent for either


@pytest.mark.asyncio
async def test_razorpay_takes_three_decimal_currencies_in_thousandths_ending_in_0() -> None:
    """Razorpay's rule for KWD, BHD, OMR (99.991 KWD is passed as 99990): 11.906 KWD was sent as 11906."""
    api = Api(razorpay_api)
    gateway = razorpay_gateway(api)
    await gateway.open_checkout(order_id="o-1", tenant="acme", description="d", total=Decimal("11.910"),
                                currency_code="KWD", success_url="https://a/ok", cancel_url="https://a/no")
    assert body(api.requests[-1])["amount"] == 11910
    assert gateway.refusal(Decimal("11.906"), "KWD") == (
        "Razorpay charges KWD in thousandths whose last digit is 0: 11.906 KWD (11906) cannot be charged")
    with pytest.raises(AmountNotChargeable, match="last digit is 0"):
        await gateway.open_checkout(order_id="o-2", tenant="acme", description="d", total=Decimal("11.906"),
                                    currency_code="KWD", success_url="https://a/ok", cancel_url="https://a/no")
    with pytest.raises(AmountNotChargeable, match="last digit is 0"):
        await gateway.refund(payment_reference="pay_ABC", total=Decimal("0.005"), currency_code="BHD",
                             idempotency_key="r", tenant="acme", order_id="o-1")
    assert len(api.requests) == 1  # only the chargeable order was sent


# -- PayPal ---------------------------------------------------------------------------------------------------


def paypal_api(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/oauth2/token":
        return httpx.Response(200, json={"access_token": "A21-token", "token_type": "Bearer", "expires_in": 32400})
    if request.headers.get("Authorization") != "Bearer A21-token":
        return httpx.Response(401, json={"name": "AUTHENTICATION_FAILURE"})
    if request.url.path == "/v2/checkout/orders":
        return httpx.Response(201, json={"id": "5O190127TN364715T", "status": "CREATED", "links": [
            {"href": f"{PAYPAL_BASE}/v2/checkout/orders/5O190127TN364715T", "rel": "self", "method": "GET"},
            {"href": "https://www.paypal.test/checkoutnow?token=5O190127TN364715T", "rel": "approve",
             "method": "GET"}]})
    if request.url.path.startswith("/v2/payments/captures/") and request.url.path.endswith("/refund"):
        return httpx.Response(201, json={"id": "1JU08902781691411", "status": "COMPLETED"})
    if request.method == "GET" and request.url.path == "/v3/vault/payment-tokens/8kk8451t":
        # Payment Method Tokens v3, "Retrieve a payment token": payment_source.card with last_digits and expiry.
        return httpx.Response(200, json={"id": "8kk8451t", "customer": {"id": "customer_4029352050"},
                                         "payment_source": {"card": {"brand": "VISA", "last_digits": "1111",
                                                                     "expiry": "2027-02"}}})
    if request.method == "GET" and request.url.path == "/v3/vault/payment-tokens/wallet1":
        return httpx.Response(200, json={"id": "wallet1", "customer": {"id": "customer_4029352050"},
                                         "payment_source": {"paypal": {"email_address": "buyer@example.com"}}})
    return httpx.Response(404, json={"name": "RESOURCE_NOT_FOUND"})


def paypal_gateway(api: Api) -> paypal.PayPalGateway:
    return paypal.PayPalGateway("pp-client", "pp-secret", PAYPAL_BASE, 5, api.transport)


@pytest.mark.asyncio
async def test_paypal_creates_an_order_and_returns_its_approve_link() -> None:
    api = Api(paypal_api)
    session = await paypal_gateway(api).open_checkout(
        order_id="o-42", tenant="acme", description="Credit package credits-10k", total=Decimal("113.05"),
        currency_code="EUR", success_url="https://app.test/ok", cancel_url="https://app.test/cancel")
    assert (session.session_id, session.url) == ("5O190127TN364715T",
                                                 "https://www.paypal.test/checkoutnow?token=5O190127TN364715T")
    token, order = api.requests
    assert token.url.path == "/v1/oauth2/token" and token.headers["Authorization"] == basic("pp-client", "pp-secret")
    assert parse_qs(token.content.decode()) == {"grant_type": ["client_credentials"]}
    assert order.headers["PayPal-Request-Id"] == "o-42"
    assert body(order) == {
        "intent": "CAPTURE",
        "purchase_units": [{"custom_id": "acme", "invoice_id": "o-42", "description": "Credit package credits-10k",
                            "amount": {"currency_code": "EUR", "value": "113.05"}}],
        "application_context": {"return_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}}


@pytest.mark.asyncio
async def test_paypal_refunds_a_capture_with_the_idempotency_key() -> None:
    api = Api(paypal_api)
    result = await paypal_gateway(api).refund(payment_reference="CAP-9", total=Decimal("59.50"), currency_code="EUR",
                                              idempotency_key="refund-r7", tenant="acme", order_id="o-42")
    assert (result.reference, result.status) == ("1JU08902781691411", "COMPLETED")
    refund = api.requests[-1]
    assert refund.url.path == "/v2/payments/captures/CAP-9/refund"
    assert refund.headers["PayPal-Request-Id"] == "refund-r7"
    assert body(refund) == {"amount": {"currency_code": "EUR", "value": "59.50"}, "invoice_id": "o-42"}


@pytest.mark.asyncio
async def test_paypal_failures_are_gateway_errors() -> None:
    no_token = paypal_gateway(Api(lambda r: httpx.Response(401, json={"error": "invalid_client"})))
    with pytest.raises(GatewayError, match="token"):
        await no_token.refund(payment_reference="CAP", total=Decimal(1), currency_code="EUR",
                              idempotency_key="k", tenant="t", order_id="o")

    def no_link(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/oauth2/token":
            return paypal_api(request)
        return httpx.Response(201, json={"id": "X", "links": [{"rel": "self", "href": "https://x"}]})

    with pytest.raises(GatewayError, match="approve"):
        await paypal_gateway(Api(no_link)).open_checkout(
            order_id="o", tenant="t", description="d", total=Decimal(1), currency_code="EUR",
            success_url="https://a/ok", cancel_url="https://a/no")

    def server_error(request: httpx.Request) -> httpx.Response:
        return paypal_api(request) if request.url.path == "/v1/oauth2/token" else httpx.Response(500, text="oops")

    with pytest.raises(GatewayError, match="500"):
        await paypal_gateway(Api(server_error)).refund(payment_reference="CAP", total=Decimal(1),
                                                       currency_code="EUR", idempotency_key="k", tenant="t",
                                                       order_id="o")


@pytest.mark.asyncio
@pytest.mark.parametrize(("total", "code", "value"), [
    ("1000", "HUF", "1000"), ("1000.00", "HUF", "1000"), ("300", "TWD", "300"), ("1000", "JPY", "1000"),
    ("10.5", "USD", "10.50"), ("113.05", "EUR", "113.05"),
])
async def test_paypal_values_carry_exactly_the_decimals_paypal_takes(total: str, code: str, value: str) -> None:
    """HUF and TWD have two decimals in ISO 4217 but none at PayPal: "1000.00" HUF was sent, which PayPal refuses."""
    api = Api(paypal_api)
    await paypal_gateway(api).open_checkout(order_id="o", tenant="acme", description="d", total=Decimal(total),
                                            currency_code=code, success_url="https://a/ok", cancel_url="https://a/no")
    assert body(api.requests[-1])["purchase_units"][0]["amount"] == {"currency_code": code, "value": value}


@pytest.mark.asyncio
@pytest.mark.parametrize(("total", "code", "why"), [
    ("1000.50", "HUF", "PayPal takes HUF in whole units: 1000.50 HUF cannot be charged"),
    ("300.10", "TWD", "PayPal takes TWD in whole units: 300.10 TWD cannot be charged"),
    ("11.910", "KWD", "PayPal does not take KWD"),
    ("100.00", "INR", "PayPal does not take INR"),
    ("10.001", "USD", "PayPal takes USD with at most 2 decimals: 10.001 USD cannot be charged"),
])
async def test_paypal_refuses_what_it_cannot_take_before_calling_it(total: str, code: str, why: str) -> None:
    api = Api(paypal_api)
    gateway = paypal_gateway(api)
    assert (gateway.refusal(Decimal(total), code) or "").startswith(why)
    with pytest.raises(AmountNotChargeable, match=why.split(":")[0]):
        await gateway.open_checkout(order_id="o", tenant="acme", description="d", total=Decimal(total),
                                    currency_code=code, success_url="https://a/ok", cancel_url="https://a/no")
    with pytest.raises(AmountNotChargeable):
        await gateway.refund(payment_reference="CAP", total=Decimal(total), currency_code=code,
                             idempotency_key="k", tenant="acme", order_id="o")
    assert api.requests == []  # not even a token


def test_gateways_are_enabled_by_their_credentials() -> None:
    assert enabled_gateways(Settings()) == {}
    enabled = enabled_gateways(Settings(razorpay_key_id="k", razorpay_key_secret="s", paypal_client_id="c",
                                        paypal_client_secret="s"))
    assert sorted(enabled) == ["paypal", "razorpay"]
    assert razorpay.build(Settings(razorpay_key_id="k")) is None and paypal.build(Settings(paypal_client_id="c")) is None


# -- saved cards ----------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_razorpay_tells_a_saved_card_token_of_the_customer() -> None:
    api = Api(razorpay_api)
    gateway = razorpay_gateway(api)
    assert await gateway.saved_card(customer="cust_RZP1", method_id="token_CARD1") == {
        "brand": "visa", "last4": "8950", "exp_month": 12, "exp_year": 2027}
    [request] = api.requests
    assert (request.method, request.url.path) == ("GET", "/v1/customers/cust_RZP1/tokens")
    assert request.headers["Authorization"] == basic("rzp_test_key", "rzp_secret")
    assert await gateway.saved_card(customer="cust_RZP1", method_id="token_UPI1") is None  # not a card
    with pytest.raises(UnknownPaymentMethod):
        await gateway.saved_card(customer="cust_RZP1", method_id="token_OTHER")
    assert await gateway.saved_card(customer=None, method_id="token_CARD1") is None  # no customer to ask


@pytest.mark.asyncio
async def test_paypal_tells_a_vaulted_card_and_refuses_another_customers_token() -> None:
    api = Api(paypal_api)
    gateway = paypal_gateway(api)
    assert await gateway.saved_card(customer="customer_4029352050", method_id="8kk8451t") == {
        "brand": "visa", "last4": "1111", "exp_month": 2, "exp_year": 2027}
    assert [r.url.path for r in api.requests] == ["/v1/oauth2/token", "/v3/vault/payment-tokens/8kk8451t"]
    assert await gateway.saved_card(customer=None, method_id="wallet1") is None  # a PayPal wallet: no expiry
    with pytest.raises(UnknownPaymentMethod):
        await gateway.saved_card(customer=None, method_id="missing")
    with pytest.raises(UnknownPaymentMethod):
        await gateway.saved_card(customer="customer_other", method_id="8kk8451t")
    down = paypal_gateway(Api(lambda r: paypal_api(r) if r.url.path == "/v1/oauth2/token" else httpx.Response(503)))
    with pytest.raises(GatewayError):
        await down.saved_card(customer=None, method_id="8kk8451t")
