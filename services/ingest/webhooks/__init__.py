"""Payment gateway webhooks: the interface every gateway adapter implements, and the types it returns.

A webhook goes through three steps, the first and last in the adapter, the middle in the core
(``billing_ingest.payments``), so adding a gateway adds a module and a registry entry, never a branch:

1. ``verify(raw_body, headers, now)``: is this body really from the gateway, and recent? Returns a
   ``VerifiedEvent`` (with a replay key derived from *signed* content) or a ``Refused``.
2. the core refuses a replay key it has already processed (409) before anything else happens;
3. ``confirm(event)``: re-fetches the object from the gateway's API and returns a ``ConfirmedPayment`` only
   when the gateway itself says it is paid / succeeded (or, for a dispute, that it is in the state the event says:
   ``dispute_movement``); ``Ignored`` for events that move no money we act on; ``NotConfirmed`` otherwise. A
   webhook body is never trusted for amounts or status: the API answer is.

Attribution convention (documented in services/ingest/WEBHOOKS.md): the checkout object carries the tenant and the
order id in its metadata -- Stripe ``metadata.tenant`` / ``metadata.order_id`` (session, payment intent or
refund), Razorpay ``notes.tenant`` / ``notes.order_id``, PayPal ``custom_id`` (tenant) / ``invoice_id``
(order id) on the purchase unit. An off-session charge that pays an invoice (dunning) also carries
Stripe ``metadata.invoice_id``: the notification names the invoice, which the ledger settles (no credit).

Saved cards (no money moves): Stripe's ``payment_method.updated`` / ``payment_method.automatically_updated`` (the
account updater gave a card a new expiry) confirm a ``ConfirmedCardUpdate`` -- the re-fetched PaymentMethod's
card details and the tenant from its ``metadata.tenant``, else its customer's -- which the core publishes as a
``payment_method.card_update`` ledger command (``billing.ledger.commands``, key: the billing account id).

Events about a customer (since session 15) are attributed by the customer's ``metadata.tenant``, which the ledger
writes on the account's customer, with the object's own mark as the fallback: Stripe's ``customer.source.updated``
of a card (a card saved as a source of the customer, renewed by the account updater) is a ``ConfirmedCardUpdate``
too; ``customer.deleted`` a ``ConfirmedCustomerDeleted``, published as a ``payment_customer.deleted`` ledger command.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from billing_events import ids
from billing_events.messages import (
    TENANT_PATTERN,
    DisputeOutcome,
    LedgerCommand,
    PaymentKind,
    PaymentNotification,
)
from billing_events.money import MoneyError, currency

ORDER_ID_LENGTH_MAX = 255
_TENANT = re.compile(TENANT_PATTERN)


class RefusalKind(StrEnum):
    """Why a webhook was refused before anything happened (the problem+json ``type`` suffix)."""

    SIGNATURE_INVALID = "webhook-signature-invalid"  # forged, tampered body, wrong secret, missing header
    EXPIRED = "webhook-expired"  # signed timestamp outside the tolerance window
    MALFORMED = "webhook-malformed"  # signed, but not an event we can read


@dataclass(frozen=True, slots=True)
class Refused:
    kind: RefusalKind
    detail: str


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """A webhook whose signature and age were checked; ``payload`` is the parsed, signed body."""

    gateway: str
    event_id: str  # the gateway's event id, for people and for PaymentNotification.gateway_event_id
    event_type: str
    payload: Mapping[str, Any]
    replay_key: str  # derived from signed content only: a header-only change cannot dodge replay protection


@dataclass(frozen=True, slots=True)
class ConfirmedPayment:
    """What the gateway's API confirmed. Amounts are exact Decimals in the currency's major unit."""

    kind: PaymentKind
    tenant: str
    order_id: str
    amount: Decimal
    currency: str
    reference: str  # the gateway's id of the money movement (see PaymentNotification.gateway_reference)
    invoice_id: str | None = None  # the invoice the payment settles (see PaymentNotification.invoice_id)
    refunded_payment: str | None = None  # a refund's payment (see PaymentNotification.refunded_payment)
    # A dispute_* movement: the dispute, the payment it disputes and, when closed, its outcome (see
    # PaymentNotification.dispute / disputed_payment / dispute_outcome).
    dispute: str | None = None
    disputed_payment: str | None = None
    dispute_outcome: DisputeOutcome | None = None
    # The gateway's fee for the dispute so far, net of what it gave back, and its currency (since session 14; see
    # PaymentNotification.dispute_fee). None: the gateway's API states none.
    dispute_fee: tuple[Decimal, str] | None = None

    def notification(self, event: VerifiedEvent, now: datetime) -> PaymentNotification:
        fee, fee_currency = self.dispute_fee if self.dispute_fee is not None else (None, None)
        return PaymentNotification(gateway=event.gateway, gateway_event_id=event.event_id, kind=self.kind,
                                   tenant=self.tenant, order_id=self.order_id, amount=self.amount,
                                   currency=self.currency, verified_at=now, gateway_reference=self.reference,
                                   invoice_id=self.invoice_id, refunded_payment=self.refunded_payment,
                                   dispute=self.dispute, disputed_payment=self.disputed_payment,
                                   dispute_outcome=self.dispute_outcome, dispute_fee=fee,
                                   dispute_fee_currency=fee_currency)


def dispute_movement(kind: PaymentKind, who: tuple[str, str], amount: Decimal, code: str, dispute: str,
                     payment: str | None, *, outcome: DisputeOutcome | None = None, movement: str | None = None,
                     invoice_id: str | None = None, fee: tuple[Decimal, str] | None = None) -> ConfirmedPayment:
    """A dispute's movement as the core publishes it: one per (gateway, kind, reference). The reference is the
    dispute for its opening, ``movement`` (the gateway's id of a withdrawal or reinstatement) or the dispute with a
    suffix for its money movements, and ``<dispute>/<outcome>`` for its close, so a won dispute that is lost later
    (an appeal, a pre-arbitration) is a new movement while a second event of one outcome is ``already_notified``.
    ``fee``: the gateway's fee for the dispute so far as its API shows it (amount, ISO 4217 code), every movement
    carrying the latest reading."""
    reference = {"dispute_opened": dispute, "dispute_closed": f"{dispute}/{outcome}"}.get(
        kind, movement or f"{dispute}/{kind.removeprefix('dispute_')}")
    return ConfirmedPayment(kind, who[0], who[1], amount, code, reference, invoice_id, dispute=dispute,
                            disputed_payment=payment, dispute_outcome=outcome, dispute_fee=fee)


@dataclass(frozen=True, slots=True)
class ConfirmedCardUpdate:
    """A saved card's details as the gateway's API gives them now (``billing_events.cards.card_details``)."""

    tenant: str
    method_id: str
    card: dict[str, Any]

    @property
    def reference(self) -> str:
        return self.method_id

    def summary(self) -> str:
        card = self.card
        return (f"card {self.method_id} of {self.tenant}: {card['brand']} {card['last4']}, expires "
                f"{card['exp_month']:02d}/{card['exp_year']}")

    def command(self, event: VerifiedEvent, now: datetime) -> LedgerCommand:
        """The ledger command, its id derived from the gateway's event (a redelivery is the same command)."""
        return LedgerCommand(command_id=ids.command_id("payment_method.card_update", event.gateway, event.event_id),
                             kind="payment_method.card_update", tenant=self.tenant, issued_at=now,
                             issued_by=f"webhook:{event.gateway}",
                             payload={"gateway": event.gateway, "method_id": self.method_id, "card": self.card})


@dataclass(frozen=True, slots=True)
class ConfirmedCustomerDeleted:
    """The gateway confirms it deleted the customer (and detached its saved methods): the tenant's account forgets
    them (``payment_customer.deleted``)."""

    tenant: str
    customer: str

    @property
    def reference(self) -> str:
        return self.customer

    def summary(self) -> str:
        return f"customer {self.customer} of {self.tenant} deleted"

    def command(self, event: VerifiedEvent, now: datetime) -> LedgerCommand:
        """The ledger command, its id derived from the gateway's event (a redelivery is the same command)."""
        return LedgerCommand(command_id=ids.command_id("payment_customer.deleted", event.gateway, event.event_id),
                             kind="payment_customer.deleted", tenant=self.tenant, issued_at=now,
                             issued_by=f"webhook:{event.gateway}",
                             payload={"gateway": event.gateway, "customer": self.customer})


@dataclass(frozen=True, slots=True)
class Ignored:
    """A genuine event that moves no money we act on (other event types, no payment required...)."""

    detail: str


class NotConfirmedKind(StrEnum):
    NOT_CONFIRMED = "payment-not-confirmed"  # the gateway's API says it is not paid / not succeeded
    UNATTRIBUTABLE = "payment-unattributable"  # paid, but without the tenant / order id metadata


@dataclass(frozen=True, slots=True)
class NotConfirmed:
    kind: NotConfirmedKind
    detail: str


class GatewayUnavailable(Exception):
    """The gateway's API could not answer (network, 5xx, rate limit, our credentials): retry later."""


# What a webhook that moves no money becomes: a ledger command on ``billing.ledger.commands``.
ConfirmedCommand = ConfirmedCardUpdate | ConfirmedCustomerDeleted
Confirmation = ConfirmedPayment | ConfirmedCommand | Ignored | NotConfirmed


class Gateway(Protocol):
    name: str

    async def verify(self, raw_body: bytes, headers: Mapping[str, str], now: datetime) -> VerifiedEvent | Refused:
        """Checks the signature over the raw body and the age of the event; no side effects."""
        ...

    async def confirm(self, event: VerifiedEvent) -> Confirmation:
        """Re-fetches the event's object from the gateway's API; may raise GatewayUnavailable."""
        ...

    async def close(self) -> None: ...


# -- helpers shared by adapters --------------------------------------------------------------------------------


def minor_units_to_amount(amount: object, currency_code: object,
                          scale_overrides: Mapping[str, int] | None = None) -> tuple[Decimal, str]:
    """An integer amount in the currency's smallest unit -> (exact Decimal, ISO 4217 code). Never a float.

    ``scale_overrides``: where a gateway's API scale differs from ISO 4217 (Stripe sends ISK and UGX with two
    decimals for backwards compatibility).
    """
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise MoneyError(f"amount must be a non-negative integer of minor units, got {amount!r}")
    if not isinstance(currency_code, str):
        raise MoneyError(f"currency must be a string, got {currency_code!r}")
    unit = currency(currency_code.upper())
    scale = (scale_overrides or {}).get(unit.code, unit.minor_scale)
    return Decimal(amount).scaleb(-scale), unit.code


def attribution(metadata: object, tenant_key: str = "tenant", order_key: str = "order_id") -> tuple[str, str] | None:
    """(tenant, order id) from a gateway object's metadata, or None when absent or malformed."""
    if not isinstance(metadata, Mapping):
        return None
    tenant, order_id = metadata.get(tenant_key), metadata.get(order_key)
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        return None
    if not isinstance(order_id, str) or not 0 < len(order_id) <= ORDER_ID_LENGTH_MAX:
        return None
    return tenant, order_id


def tenant_reference(metadata: object, key: str = "tenant") -> str | None:
    """The tenant a gateway object's metadata names, or None when absent or malformed."""
    if not isinstance(metadata, Mapping):
        return None
    tenant = metadata.get(key)
    return tenant if isinstance(tenant, str) and _TENANT.match(tenant) else None


def invoice_reference(metadata: object, key: str = "invoice_id") -> str | None:
    """The invoice a payment settles, from its metadata, or None when absent or malformed."""
    if not isinstance(metadata, Mapping):
        return None
    value = metadata.get(key)
    return value if isinstance(value, str) and 0 < len(value) <= ORDER_ID_LENGTH_MAX else None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (Starlette's Headers already are; plain dicts in tests are not)."""
    value = headers.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value
