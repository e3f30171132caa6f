"""PayPal Orders v2 through httpx (injectable transport): the purchase unit carries ``custom_id`` (tenant) and
``invoice_id`` (order id); the customer approves on PayPal's hosted page (the ``approve`` link). A saved card is a
vault payment token (``GET /v3/vault/payment-tokens/{id}``: ``payment_source.card.brand``, ``last_digits``,
``expiry`` as ``YYYY-MM``)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import httpx
from billing_events.cards import CardDetailsError, card_details
from billing_events.money import MoneyError, currency
from billing_ledger.gateways import (
    AmountNotChargeable,
    Charge,
    CheckoutSession,
    GatewayError,
    RefundResult,
    UnknownPaymentMethod,
    read_answer,
    to_minor_units,
)
from billing_runtime.settings import Settings

NAME = "paypal"
# The currencies PayPal's REST APIs take for payments (developer.paypal.com/api/rest/reference/currency-codes;
# BRL and MYR for in-country accounts only). Any other (KWD, INR, ...) is refused before PayPal is called.
PAYPAL_CURRENCIES = frozenset({"AUD", "BRL", "CAD", "CNY", "CZK", "DKK", "EUR", "GBP", "HKD", "HUF", "ILS", "JPY",
                               "MXN", "MYR", "NOK", "NZD", "PHP", "PLN", "SEK", "SGD", "CHF", "THB", "TWD", "USD"})
# "This currency does not support decimals. If you pass a decimal amount, an error occurs." (HUF, JPY, TWD; JPY has
# none in ISO 4217 either). Their values are sent as whole units: "1000", never "1000.00".
PAYPAL_SCALE_OVERRIDES = {"HUF": 0, "TWD": 0}
# A vaulted card's ``expiry``: "The card expiration year and month, in Internet date format" (2028-04).
_EXPIRY = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")


class PayPalGateway:
    name = NAME

    def __init__(self, client_id: str, client_secret: str, api_base: str, timeout_seconds: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._auth = (client_id, client_secret)
        self._base = api_base.rstrip("/")
        self._timeout = timeout_seconds
        self._transport = transport

    async def _bearer(self, client: httpx.AsyncClient) -> str:
        """An OAuth access token for one call (client credentials), as its ``Authorization`` header."""
        token = await client.post("/v1/oauth2/token", auth=self._auth, data={"grant_type": "client_credentials"})
        if token.status_code != 200:
            raise GatewayError(f"PayPal token: {token.status_code}")
        return f"Bearer {token.json()['access_token']}"

    async def _call(self, path: str, body: dict[str, object], request_id: str) -> dict[str, object]:
        async with httpx.AsyncClient(base_url=self._base, timeout=self._timeout, transport=self._transport) as client:
            try:
                response = await client.post(path, json=body, headers={
                    "Authorization": await self._bearer(client), "PayPal-Request-Id": request_id})
            except httpx.HTTPError as exc:
                raise GatewayError(f"PayPal: {exc}") from exc
        if response.status_code >= 400:
            raise GatewayError(f"PayPal answered {response.status_code}: {response.text[:200]}")
        data: dict[str, object] = response.json()
        return data

    async def _get(self, path: str) -> tuple[int, Any]:
        async with httpx.AsyncClient(base_url=self._base, timeout=self._timeout, transport=self._transport) as client:
            try:
                response = await client.get(path, headers={"Authorization": await self._bearer(client)})
            except httpx.HTTPError as exc:
                raise GatewayError(f"PayPal: {exc}") from exc
        return read_answer("PayPal", response)

    async def attribute_method(self, *, customer: str | None, method_id: str, tenant: str) -> bool:
        return False  # ingest follows no PayPal card updates: nothing to attribute

    async def attribute_customer(self, *, customer: str, tenant: str) -> bool:
        return False  # ingest follows no PayPal customer events: nothing to attribute

    async def saved_card(self, *, customer: str | None, method_id: str) -> dict[str, Any] | None:
        status, token = await self._get(f"/v3/vault/payment-tokens/{method_id}")
        if status >= 400 or not isinstance(token, dict):
            raise UnknownPaymentMethod(f"PayPal's vault has no payment token {method_id} ({status})")
        owner = token.get("customer", {}).get("id") if isinstance(token.get("customer"), dict) else None
        if customer and owner and owner != customer:
            raise UnknownPaymentMethod(f"payment token {method_id} belongs to PayPal customer {owner}, not to the "
                                       f"account's {customer}")
        source = token.get("payment_source")
        card = source.get("card") if isinstance(source, dict) else None
        if not isinstance(card, dict):
            return None  # a PayPal wallet, Venmo, a bank: no expiry to watch
        expiry = _EXPIRY.match(str(card.get("expiry", "")))
        if expiry is None:
            return None
        try:
            return card_details({"brand": card.get("brand"), "last4": card.get("last_digits"),
                                 "exp_month": int(expiry.group(2)), "exp_year": int(expiry.group(1))})
        except CardDetailsError:  # not what PayPal documents: saved without details rather than refused
            return None

    def refusal(self, total: Decimal, currency_code: str) -> str | None:
        code = currency_code.upper()
        if code not in PAYPAL_CURRENCIES:
            return f"PayPal does not take {code} (its currencies: {', '.join(sorted(PAYPAL_CURRENCIES))})"
        try:
            to_minor_units(total, code, PAYPAL_SCALE_OVERRIDES)
        except MoneyError:
            scale = PAYPAL_SCALE_OVERRIDES.get(code, currency(code).minor_scale)
            return (f"PayPal takes {code} " + ("in whole units" if scale == 0 else f"with at most {scale} decimals")
                    + f": {total} {code} cannot be charged")
        return None

    def _value(self, total: Decimal, code: str) -> str:
        """The amount as PayPal's ``value``: a decimal string with exactly the currency's decimals at PayPal."""
        refused = self.refusal(total, code)
        if refused:
            raise AmountNotChargeable(refused)
        scale = PAYPAL_SCALE_OVERRIDES.get(code.upper(), currency(code.upper()).minor_scale)
        return f"{total.quantize(Decimal(1).scaleb(-scale)):f}"

    async def open_checkout(self, *, order_id: str, tenant: str, description: str, total: Decimal,
                            currency_code: str, success_url: str, cancel_url: str) -> CheckoutSession:
        order = await self._call("/v2/checkout/orders", {
            "intent": "CAPTURE",
            "purchase_units": [{"custom_id": tenant, "invoice_id": order_id, "description": description[:127],
                                "amount": {"currency_code": currency_code, "value": self._value(total, currency_code)}}],
            "application_context": {"return_url": success_url, "cancel_url": cancel_url}}, order_id)
        links = order.get("links") or []
        approve = next((link["href"] for link in links if isinstance(link, dict) and link.get("rel") in
                        ("approve", "payer-action")), None)
        if approve is None:
            raise GatewayError("PayPal order without an approve link")
        return CheckoutSession(str(order["id"]), str(approve))

    async def charge_saved_method(self, *, customer: str | None, method_id: str, total: Decimal,
                                  currency_code: str, idempotency_key: str, tenant: str, order_id: str,
                                  invoice_id: str | None = None) -> Charge:
        return Charge(False, None, "paypal vaulted payments are not enabled")

    async def refund(self, *, payment_reference: str, total: Decimal, currency_code: str, idempotency_key: str,
                     tenant: str, order_id: str) -> RefundResult:
        refund = await self._call(f"/v2/payments/captures/{payment_reference}/refund", {
            "amount": {"currency_code": currency_code, "value": self._value(total, currency_code)},
            "invoice_id": order_id}, idempotency_key)
        return RefundResult(str(refund["id"]), str(refund.get("status", "PENDING")))


def build(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> PayPalGateway | None:
    if not (settings.paypal_client_id and settings.paypal_client_secret):
        return None
    return PayPalGateway(settings.paypal_client_id, settings.paypal_client_secret, settings.paypal_api_base,
                         settings.gateway_api_timeout_seconds, transport)
