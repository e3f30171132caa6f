"""Stripe through the official SDK (``stripe.StripeClient``): hosted Checkout Sessions (card data never touches
our servers; 3-D Secure / SCA is handled by the hosted page), off-session PaymentIntents, refunds, a saved
PaymentMethod's card details (``card.brand``, ``last4``, ``exp_month``, ``exp_year``) and its ``metadata.tenant``
(written when it is saved, read by ingest on Stripe's card updates), and the Customer's ``metadata.tenant`` (written
when the ledger is told the account's customer, or saves a method of it; read by ingest on Stripe's events about the
customer)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import stripe as stripe_sdk
from billing_events.cards import CardDetailsError, card_details
from billing_ledger.gateways import (
    Charge,
    CheckoutSession,
    GatewayError,
    RefundResult,
    UnknownCustomer,
    UnknownPaymentMethod,
    chargeable_minor_units,
    minor_units_refusal,
)
from billing_runtime.settings import Settings

NAME = "stripe"
# Stripe's API takes these zero-decimal ISO 4217 currencies with two decimals (backwards compatibility).
STRIPE_SCALE_OVERRIDES = {"ISK": 2, "UGX": 2}
# Stripe's three-decimal currencies: amounts in thousandths, but Payment Intents, Checkout and Refunds require the
# last digit to be 0 "to ensure compatibility with Stripe's payments partners" (stripe.com/docs/currencies,
# "Three-decimal currencies"): 5.124 KWD is refused, 5.120 or 5.130 is charged.
STRIPE_LAST_DIGIT_ZERO = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})
STRIPE_NETWORK_RETRIES_MAX = 2
# PaymentIntent statuses of a payment under way: the money may still arrive (bank debits, delayed card
# networks, an authorisation awaiting capture), so they are pending, never declines (the webhook settles them).
PENDING_INTENT_STATUSES = frozenset({"processing", "requires_capture"})


class StripeGateway:
    name = NAME

    def __init__(self, client: stripe_sdk.StripeClient) -> None:
        self._client = client

    def refusal(self, total: Decimal, currency_code: str) -> str | None:
        return minor_units_refusal("Stripe", total, currency_code, overrides=STRIPE_SCALE_OVERRIDES,
                                   last_digit_zero=currency_code.upper() in STRIPE_LAST_DIGIT_ZERO)

    def _minor(self, total: Decimal, code: str) -> int:
        return chargeable_minor_units(self, total, code, STRIPE_SCALE_OVERRIDES)

    async def open_checkout(self, *, order_id: str, tenant: str, description: str, total: Decimal,
                            currency_code: str, success_url: str, cancel_url: str) -> CheckoutSession:
        metadata = {"tenant": tenant, "order_id": order_id}
        try:
            session = await self._client.v1.checkout.sessions.create_async(params={
                "mode": "payment", "success_url": success_url, "cancel_url": cancel_url,
                "client_reference_id": order_id, "metadata": metadata,
                "line_items": [{"quantity": 1, "price_data": {
                    "currency": currency_code.lower(), "unit_amount": self._minor(total, currency_code),
                    "product_data": {"name": description}}}],
            }, options={"idempotency_key": f"checkout-{order_id}"})
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        return CheckoutSession(session_id=session.id, url=str(session.url))

    async def charge_saved_method(self, *, customer: str | None, method_id: str, total: Decimal,
                                  currency_code: str, idempotency_key: str, tenant: str, order_id: str,
                                  invoice_id: str | None = None) -> Charge:
        refused = self.refusal(total, currency_code)
        if refused:  # Stripe would answer 400 for every attempt: a decline of this method, nothing sent
            return Charge(False, None, refused)
        metadata = {"tenant": tenant, "order_id": order_id}
        if invoice_id:  # the payment settles this invoice (dunning): the ledger grants no credit for it
            metadata["invoice_id"] = invoice_id
        params: dict[str, object] = {
            "amount": self._minor(total, currency_code), "currency": currency_code.lower(),
            "payment_method": method_id, "confirm": True, "off_session": True, "metadata": metadata}
        if customer:
            params["customer"] = customer
        try:
            intent = await self._client.v1.payment_intents.create_async(
                params=params, options={"idempotency_key": idempotency_key})  # type: ignore[arg-type]
        except stripe_sdk.CardError as exc:  # declined, or the bank wants the customer present (SCA)
            return Charge(False, None, exc.code or exc.user_message or str(exc))
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        if intent.status in PENDING_INTENT_STATUSES:
            return Charge(False, intent.id, f"payment intent is {intent.status}", pending=True)
        if intent.status != "succeeded":
            return Charge(False, intent.id, f"payment intent is {intent.status}")
        return Charge(True, intent.id)

    async def refund(self, *, payment_reference: str, total: Decimal, currency_code: str, idempotency_key: str,
                     tenant: str, order_id: str) -> RefundResult:
        try:
            refund = await self._client.v1.refunds.create_async(params={
                "payment_intent": payment_reference, "amount": self._minor(total, currency_code),
                "metadata": {"tenant": tenant, "order_id": order_id}}, options={"idempotency_key": idempotency_key})
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        return RefundResult(refund.id, str(refund.status))

    async def _payment_method(self, method_id: str) -> dict[str, Any]:
        """The PaymentMethod ``method_id`` as Stripe has it; ``UnknownPaymentMethod`` when Stripe does not know it."""
        try:
            return (await self._client.v1.payment_methods.retrieve_async(method_id)).to_dict()
        except stripe_sdk.InvalidRequestError as exc:  # 404: no such PaymentMethod in this account / mode
            raise UnknownPaymentMethod(f"Stripe does not know payment method {method_id}: "
                                       f"{exc.user_message or exc}") from exc
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc

    async def saved_card(self, *, customer: str | None, method_id: str) -> dict[str, Any] | None:
        method = await self._payment_method(method_id)
        owner = method.get("customer")
        owner = owner.get("id") if isinstance(owner, dict) else owner
        if customer and owner and owner != customer:
            raise UnknownPaymentMethod(f"payment method {method_id} belongs to Stripe customer {owner}, not to "
                                       f"the account's {customer}")
        card = method.get("card")
        if method.get("type") != "card" or not isinstance(card, dict):
            return None  # a bank debit, a wallet...: no expiry to watch
        try:
            return card_details({"brand": card.get("brand"), "last4": card.get("last4"),
                                 "exp_month": card.get("exp_month"), "exp_year": card.get("exp_year")})
        except CardDetailsError:  # not what Stripe documents: saved without details rather than refused forever
            return None

    async def attribute_method(self, *, customer: str | None, method_id: str, tenant: str) -> bool:
        """``metadata.tenant`` on the PaymentMethod: ingest attributes Stripe's ``payment_method.updated`` /
        ``automatically_updated`` of it by that (it was never written, so the account updater's renewals of cards
        the ledger saved were ignored). Stripe updates a method only once it is attached to a customer (its account
        updater renews only those): an unattached one is left as it is (False)."""
        method = await self._payment_method(method_id)
        metadata = method.get("metadata") if isinstance(method.get("metadata"), dict) else {}
        marked = metadata.get("tenant")
        if marked == tenant:
            return True
        if marked:  # its card updates would go to that tenant: not this account's method
            raise UnknownPaymentMethod(f"payment method {method_id} is another billing account's at Stripe "
                                       f"(metadata.tenant {marked!r})")
        owner = method.get("customer")
        if not owner:
            return False
        try:
            await self._client.v1.payment_methods.update_async(method_id, params={"metadata": {"tenant": tenant}})
        except stripe_sdk.InvalidRequestError as exc:  # detached meanwhile: nothing Stripe would update
            raise UnknownPaymentMethod(f"Stripe refused to mark payment method {method_id}: "
                                       f"{exc.user_message or exc}") from exc
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        return True


    async def attribute_customer(self, *, customer: str, tenant: str) -> bool:
        """``metadata.tenant`` on the Customer: ingest attributes Stripe's events about the customer by it
        (``customer.source.updated``: a card saved as a source of it renewed by the account updater;
        ``customer.deleted``). Before session 15 only the PaymentMethods were marked, so those events named no
        tenant. A customer Stripe does not know, deleted, or marked another tenant's is not this account's."""
        try:
            found = (await self._client.v1.customers.retrieve_async(customer)).to_dict()
        except stripe_sdk.InvalidRequestError as exc:  # 404: no such customer in this account / mode
            raise UnknownCustomer(f"Stripe does not know customer {customer}: {exc.user_message or exc}") from exc
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        if found.get("deleted"):
            raise UnknownCustomer(f"Stripe customer {customer} is deleted")
        metadata = found.get("metadata") if isinstance(found.get("metadata"), dict) else {}
        marked = metadata.get("tenant")
        if marked == tenant:
            return True
        if marked:  # its events would go to that tenant: not this account's customer
            raise UnknownCustomer(f"Stripe customer {customer} is another billing account's (metadata.tenant "
                                  f"{marked!r})")
        try:
            await self._client.v1.customers.update_async(customer, params={"metadata": {"tenant": tenant}})
        except stripe_sdk.InvalidRequestError as exc:  # deleted meanwhile
            raise UnknownCustomer(f"Stripe refused to mark customer {customer}: {exc.user_message or exc}") from exc
        except stripe_sdk.StripeError as exc:
            raise GatewayError(f"Stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        return True


def build(settings: Settings, http_client: stripe_sdk.HTTPClient | None = None) -> StripeGateway | None:
    if not settings.stripe_api_key:
        return None
    api = settings.stripe_api_address()  # BILLING_STRIPE_API_BASE (stripe-mock, a test's fake), else Stripe's
    http = http_client or stripe_sdk.HTTPXClient(timeout=settings.gateway_api_timeout_seconds)
    return StripeGateway(stripe_sdk.StripeClient(settings.stripe_api_key, http_client=http,
                                                 max_network_retries=STRIPE_NETWORK_RETRIES_MAX,
                                                 base_addresses={"api": api} if api else None))
