"""Outbound payment gateways: one interface, one module per gateway (a new gateway is a new module).

The ledger asks a gateway for three things, never touching card data (hosted pages and saved tokens only):

* ``open_checkout``: a hosted checkout page for an order (its total, its currency, tenant and order id in the
  gateway's metadata so the verified webhook can be attributed; the order id is the idempotency key);
* ``charge_saved_method``: an off-session charge of a saved payment method (auto-top-up, dunning). Its
  ``Charge`` is a success, a decline, or *pending* (the gateway took the payment but has not settled it, e.g. a
  Stripe PaymentIntent ``processing``): a pending charge is neither paid nor declined, so the caller must not
  charge another method for it; the gateway's webhook settles it. ``invoice_id`` (dunning) goes into the
  gateway's metadata next to ``order_id``: the payment settles that invoice and grants no credit;
* ``refund``: pay back a payment;
* ``saved_card``: what the gateway knows of a saved method that is a card (brand, last four digits, expiry month
  and year; ``billing_events.cards``), asked when the method is saved so its expiry can be watched. Never the
  number. ``None`` for a method that is not a card (a bank debit) or that the adapter cannot look up;
* ``attribute_method``: marks a saved method at the gateway as the tenant's, when it is saved, so that the
  gateway's own notifications about it can be attributed: Stripe's ``payment_method.updated`` /
  ``automatically_updated`` (its account updater renewed the card) reach the ledger only for a method (or customer)
  whose ``metadata.tenant`` names the tenant (ingest reads it). A no-op for gateways whose card updates the ledger
  does not follow;
* ``attribute_customer``: marks the account's gateway customer the tenant's, when the ledger is told it
  (``PUT .../gateway-customers/{gateway}``) and when a method of it is saved, so that the gateway's notifications about
  the customer can be attributed: Stripe's ``customer.source.updated`` (its account updater renewed a card saved as a
  source of the customer) and ``customer.deleted`` reach the ledger by the customer's ``metadata.tenant`` (ingest reads
  it; since session 15). A no-op for the other gateways.

Amounts are exact Decimals; each adapter converts them to the gateway's integer minor units itself, and knows
what its gateway cannot take (``refusal``: a currency it does not support, an amount finer than it charges, e.g. a
last digit of thousandths other than 0 at Stripe): such an amount is refused before anything is sent, never
rounded, so what a gateway charges is always what the ledger books.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from billing_events.money import MoneyError, currency


class GatewayError(Exception):
    """The gateway could not be reached or answered with a server error: nothing is known, retry later."""


class UnknownPaymentMethod(Exception):
    """The gateway does not know this saved method (or it belongs to another customer): nothing to save."""


class UnknownCustomer(Exception):
    """The gateway does not know this customer, it was deleted, or the gateway marks it another tenant's: it is not
    this account's customer there."""


class AmountNotChargeable(MoneyError):
    """The gateway cannot charge or pay back this amount in this currency (``OutboundGateway.refusal`` says
    why); nothing was sent to it. Retrying changes nothing."""


@dataclass(frozen=True)
class CheckoutSession:
    session_id: str
    url: str


@dataclass(frozen=True)
class Charge:
    ok: bool
    reference: str | None  # the gateway's payment id (Stripe payment intent) when there is one
    error: str | None = None  # why a charge was declined (card declined, authentication required, ...)
    # Neither paid nor declined yet (``ok`` is False): the money may still arrive; never fail over on it.
    pending: bool = False


@dataclass(frozen=True)
class RefundResult:
    reference: str
    status: str


class OutboundGateway(Protocol):
    name: str

    def refusal(self, total: Decimal, currency_code: str) -> str | None:
        """Why this gateway cannot charge ``total`` in ``currency_code`` (None: it can). No I/O: checked before an
        order is placed; ``open_checkout`` and ``refund`` raise ``AmountNotChargeable`` with it and
        ``charge_saved_method`` declines with it, without calling the gateway."""
        ...

    async def open_checkout(self, *, order_id: str, tenant: str, description: str, total: Decimal, currency_code: str,
                            success_url: str, cancel_url: str) -> CheckoutSession: ...

    async def charge_saved_method(self, *, customer: str | None, method_id: str, total: Decimal, currency_code: str,
                                  idempotency_key: str, tenant: str, order_id: str,
                                  invoice_id: str | None = None) -> Charge: ...

    async def refund(self, *, payment_reference: str, total: Decimal, currency_code: str, idempotency_key: str,
                     tenant: str, order_id: str) -> RefundResult: ...

    async def saved_card(self, *, customer: str | None, method_id: str) -> dict[str, Any] | None:
        """The card details of a saved method (``billing_events.cards.card_details``), None when it is no card;
        ``UnknownPaymentMethod`` when the gateway does not know it, ``GatewayError`` when it cannot answer."""
        ...

    async def attribute_method(self, *, customer: str | None, method_id: str, tenant: str) -> bool:
        """Marks the saved method as ``tenant``'s at the gateway (idempotent); False when the gateway keeps no such
        mark for it (nothing to follow, or it cannot take one: a Stripe method attached to no customer).
        ``UnknownPaymentMethod`` when the gateway does not know it or marks it another tenant's, ``GatewayError``
        when it cannot answer."""
        ...

    async def attribute_customer(self, *, customer: str, tenant: str) -> bool:
        """Marks the gateway's customer ``customer`` as ``tenant``'s (idempotent); False when the gateway keeps no
        such mark (nothing of it is followed). ``UnknownCustomer`` when the gateway does not know it, it was deleted,
        or it is marked another tenant's; ``GatewayError`` when the gateway cannot answer."""
        ...


def read_answer(gateway: str, response: Any) -> tuple[int, Any]:
    """A gateway API's answer to a read (an ``httpx.Response``): its status and JSON body (None when not JSON). The
    gateway unavailable, or refusing our credentials or rate (5xx, 401, 403, 429), is a ``GatewayError`` (nothing
    is known); any other status is the caller's to read (404: no such object)."""
    if response.status_code >= 500 or response.status_code in (401, 403, 429):
        raise GatewayError(f"{gateway} answered {response.status_code}")
    try:
        return response.status_code, response.json()
    except ValueError:  # not JSON: nothing to read from it
        return response.status_code, None


def to_minor_units(amount: Decimal, code: str, overrides: dict[str, int] | None = None) -> int:
    """An exact amount as integer minor units of ``code`` (ISO 4217 scale); refuses finer amounts."""
    scale = (overrides or {}).get(code.upper(), currency(code.upper()).minor_scale)
    scaled = amount.scaleb(scale)
    if scaled != scaled.to_integral_value():
        raise MoneyError(f"{amount} {code} has more decimals than the currency allows")
    return int(scaled)


def minor_units_refusal(gateway: str, total: Decimal, code: str, *, last_digit_zero: bool,
                        overrides: dict[str, int] | None = None) -> str | None:
    """Why ``gateway`` (its name as shown) cannot charge ``total`` ``code``: finer than its scale for the currency,
    or (``last_digit_zero``: Stripe's and Razorpay's three-decimal currencies) in thousandths whose last digit is not
    0; None when it can."""
    try:
        minor = to_minor_units(total, code, overrides)
    except MoneyError as exc:
        return f"{gateway} cannot charge it: {exc}"
    if last_digit_zero and minor % 10:
        return (f"{gateway} charges {code.upper()} in thousandths whose last digit is 0: {total} {code.upper()} "
                f"({minor}) cannot be charged")
    return None


def chargeable_minor_units(gateway: OutboundGateway, total: Decimal, code: str,
                           overrides: dict[str, int] | None = None) -> int:
    """``total`` as the integer minor units ``gateway`` is sent; ``AmountNotChargeable`` with its ``refusal``."""
    refused = gateway.refusal(total, code)
    if refused:
        raise AmountNotChargeable(refused)
    return to_minor_units(total, code, overrides)
