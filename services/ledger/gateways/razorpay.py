"""Razorpay Orders API through httpx (injectable transport): the order carries ``notes.tenant`` and
``notes.order_id``; the customer pays on Razorpay's hosted Checkout (``key_id`` + Razorpay order id). A saved
card is a token of the account's Razorpay customer (``GET /v1/customers/{id}/tokens``: ``card.network``,
``last4``, ``expiry_month``, ``expiry_year``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
from billing_events.cards import CardDetailsError, card_details, four_digit_year
from billing_events.money import currency
from billing_ledger.gateways import (
    Charge,
    CheckoutSession,
    GatewayError,
    RefundResult,
    UnknownPaymentMethod,
    chargeable_minor_units,
    minor_units_refusal,
    read_answer,
)
from billing_runtime.settings import Settings

NAME = "razorpay"
# Razorpay takes three-decimal currencies (KWD, BHD, OMR, ...) in thousandths, "as per payment guidelines" with the
# last digit 0 (razorpay.com/docs, Checkout parameters: 99.991 KWD is passed as 99990).
LAST_DIGIT_ZERO_SCALE = 3


class RazorpayGateway:
    name = NAME

    def __init__(self, key_id: str, key_secret: str, api_base: str, timeout_seconds: float,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._key_id = key_id
        self._auth = (key_id, key_secret)
        self._base = api_base.rstrip("/")
        self._timeout = timeout_seconds
        self._transport = transport

    def refusal(self, total: Decimal, currency_code: str) -> str | None:
        return minor_units_refusal("Razorpay", total, currency_code,
                                   last_digit_zero=currency(currency_code.upper()).minor_scale == LAST_DIGIT_ZERO_SCALE)

    def _minor(self, total: Decimal, code: str) -> int:
        return chargeable_minor_units(self, total, code)

    async def _post(self, path: str, body: dict[str, object], idempotency_key: str) -> dict[str, object]:
        async with httpx.AsyncClient(base_url=self._base, auth=self._auth, timeout=self._timeout,
                                     transport=self._transport) as client:
            try:
                response = await client.post(path, json=body, headers={"X-Idempotency-Key": idempotency_key})
            except httpx.HTTPError as exc:
                raise GatewayError(f"Razorpay: {exc}") from exc
        if response.status_code >= 500:
            raise GatewayError(f"Razorpay answered {response.status_code}")
        data: dict[str, object] = response.json()
        if response.status_code >= 400:
            raise GatewayError(f"Razorpay refused: {data.get('error')}")
        return data

    async def _get(self, path: str) -> tuple[int, Any]:
        async with httpx.AsyncClient(base_url=self._base, auth=self._auth, timeout=self._timeout,
                                     transport=self._transport) as client:
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                raise GatewayError(f"Razorpay: {exc}") from exc
        return read_answer("Razorpay", response)

    async def attribute_method(self, *, customer: str | None, method_id: str, tenant: str) -> bool:
        return False  # ingest follows no Razorpay card updates: nothing to attribute

    async def attribute_customer(self, *, customer: str, tenant: str) -> bool:
        return False  # ingest follows no Razorpay customer events: nothing to attribute

    async def saved_card(self, *, customer: str | None, method_id: str) -> dict[str, Any] | None:
        if not customer:  # a token belongs to a customer: without the account's, it cannot be looked up
            return None
        status, data = await self._get(f"/v1/customers/{customer}/tokens")
        items = data.get("items") if status == 200 and isinstance(data, dict) else None
        token = next((t for t in items or [] if isinstance(t, dict) and t.get("id") == method_id), None)
        if token is None:
            raise UnknownPaymentMethod(f"Razorpay customer {customer} has no token {method_id}")
        card = token.get("card")
        if token.get("method") != "card" or not isinstance(card, dict):
            return None
        try:
            return card_details({"brand": card.get("network"), "last4": card.get("last4"),
                                 "exp_month": card.get("expiry_month"),
                                 "exp_year": four_digit_year(card.get("expiry_year"))})
        except CardDetailsError:  # not what Razorpay documents: saved without details rather than refused
            return None

    async def open_checkout(self, *, order_id: str, tenant: str, description: str, total: Decimal,
                            currency_code: str, success_url: str, cancel_url: str) -> CheckoutSession:
        order = await self._post("/v1/orders", {"amount": self._minor(total, currency_code),
                                                "currency": currency_code, "receipt": order_id[:40],
                                                "notes": {"tenant": tenant, "order_id": order_id}}, order_id)
        rid = str(order["id"])
        # The hosted page is opened by the front end with key_id + order id; the success URL is where it returns.
        return CheckoutSession(rid, f"{success_url}{'&' if '?' in success_url else '?'}razorpay_order_id={rid}"
                                    f"&key_id={self._key_id}")

    async def charge_saved_method(self, *, customer: str | None, method_id: str, total: Decimal,
                                  currency_code: str, idempotency_key: str, tenant: str, order_id: str,
                                  invoice_id: str | None = None) -> Charge:
        return Charge(False, None, "razorpay recurring payments need a mandate; not enabled")

    async def refund(self, *, payment_reference: str, total: Decimal, currency_code: str, idempotency_key: str,
                     tenant: str, order_id: str) -> RefundResult:
        refund = await self._post(f"/v1/payments/{payment_reference}/refund",
                                  {"amount": self._minor(total, currency_code),
                                   "notes": {"tenant": tenant, "order_id": order_id}}, idempotency_key)
        return RefundResult(str(refund["id"]), str(refund.get("status", "pending")))


def build(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> RazorpayGateway | None:
    if not (settings.razorpay_key_id and settings.razorpay_key_secret):
        return None
    return RazorpayGateway(settings.razorpay_key_id, settings.razorpay_key_secret, settings.razorpay_api_base,
                           settings.gateway_api_timeout_seconds, transport)
