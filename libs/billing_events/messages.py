"""Versioned message models for every topic (DESIGN.md section 3). JSON on the wire, Decimals as strings.

Each model carries ``schema`` (``<name>/v<N>``); producers also put it in the ``schema`` header.
"""

from __future__ import annotations

import json
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

from billing_events.money import MoneyError, parse_decimal
from billing_events.timeutil import Timestamp, parse_timestamp


def _decimal(value: Any) -> Decimal:
    try:
        return parse_decimal(value, field="quantity")
    except MoneyError as exc:
        raise ValueError(str(exc)) from exc


def _signed_decimal(value: Any) -> Decimal:
    try:
        return parse_decimal(value, field="amount", allow_negative=True)
    except MoneyError as exc:
        raise ValueError(str(exc)) from exc


# A non-negative decimal that was never a binary float; serialised as a string.
DecimalStr = Annotated[Decimal, BeforeValidator(_decimal), PlainSerializer(lambda d: str(d), return_type=str)]
SignedDecimalStr = Annotated[
    Decimal, BeforeValidator(_signed_decimal), PlainSerializer(lambda d: str(d), return_type=str)
]
AwareTimestamp = Annotated[Timestamp, BeforeValidator(parse_timestamp)]

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CODE_PATTERN = r"^[a-z][a-z0-9_.-]{0,63}$"
# A key naming what a command creates and a URL path then addresses (a subscription, an allocation request, an
# order, a refund request, a payment method, a workspace): 1 to 128 ASCII letters, digits, '.', '_', ':' or '-',
# starting with a letter or digit. No '/': a path segment cannot hold one (`a%2Fb` is routed as two segments).
RESOURCE_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

# Limits on what one usage event may carry (TIGER_STYLE: a bound on everything, chosen once).
EVENT_ID_LENGTH_MAX = 128
PROPERTIES_COUNT_MAX = 32
PROPERTY_NAME_LENGTH_MAX = 64
PROPERTY_VALUE_LENGTH_MAX = 256
RAW_EVENT_BYTES_MAX = 16 * 1024

PropertyValue = str | int | bool


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_json(self) -> bytes:
        # by_alias: the version travels as "schema" on the wire (models also accept the field name).
        return self.model_dump_json(by_alias=True).encode()


class UsageEvent(Message):
    """A usage event as an upstream service sends it (``billing.usage.raw`` / ``POST /v1/usage``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [{
        "id": "evt-0001", "tenant": "acme", "meter": "api_calls", "quantity": "3",
        "timestamp": "2026-11-21T10:00:00Z", "properties": {"endpoint": "/v1/search"},
    }]})

    id: str = Field(min_length=1, max_length=EVENT_ID_LENGTH_MAX, description="Unique per tenant; the dedup key")
    tenant: str = Field(pattern=TENANT_PATTERN, description="Tenant (organisation) the usage belongs to")
    meter: str = Field(pattern=CODE_PATTERN, description="Meter code from the catalogue", examples=["api_calls"])
    quantity: DecimalStr = Field(description="Decimal string or integer, never a binary float", examples=["3"])
    timestamp: AwareTimestamp = Field(description="ISO 8601 with offset, when the usage happened")
    properties: dict[str, PropertyValue] = Field(default_factory=dict, description="Dimensions, e.g. model, user")
    correction_of: str | None = Field(default=None, max_length=EVENT_ID_LENGTH_MAX,
                                      description="Id of an earlier event this one amends or voids")

    @field_validator("properties")
    @classmethod
    def _bounded_properties(cls, value: dict[str, PropertyValue]) -> dict[str, PropertyValue]:
        if len(value) > PROPERTIES_COUNT_MAX:
            raise ValueError(f"at most {PROPERTIES_COUNT_MAX} properties")
        for name, item in value.items():
            if not name or len(name) > PROPERTY_NAME_LENGTH_MAX:
                raise ValueError(f"property names are 1-{PROPERTY_NAME_LENGTH_MAX} characters")
            if isinstance(item, str) and len(item) > PROPERTY_VALUE_LENGTH_MAX:
                raise ValueError(f"property {name!r} is longer than {PROPERTY_VALUE_LENGTH_MAX} characters")
        return value


class AcceptedUsage(Message):
    """A validated, deduplicated usage event (``billing.usage.accepted``, key: billing account id)."""

    schema_: Literal["usage.accepted/v1"] = Field(default="usage.accepted/v1", alias="schema")
    account_id: UUID
    event: UsageEvent
    accepted_at: Timestamp
    source: str = Field(description="Where it came from: kafka:<topic>:<partition>:<offset> or http:<request>")
    catalog_version: int = Field(ge=0, description="Catalogue version ingest validated against; rating waits "
                                                  "until it knows at least this version")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class RejectReason(StrEnum):
    INVALID_JSON = "invalid_json"
    SCHEMA_INVALID = "schema_invalid"
    INVALID_QUANTITY = "invalid_quantity"
    NAIVE_TIMESTAMP = "naive_timestamp"
    FUTURE_TIMESTAMP = "future_timestamp"
    TOO_OLD = "too_old"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNKNOWN_TENANT = "unknown_tenant"
    UNKNOWN_METER = "unknown_meter"
    MISSING_PROPERTY = "missing_property"
    PERIOD_CLOSED = "period_closed"
    NO_PRICE = "no_price"
    INSUFFICIENT_CREDIT = "insufficient_credit"
    UNKNOWN_CORRECTION = "unknown_correction"  # correction_of names no rated event of the tenant
    INVALID_CORRECTION = "invalid_correction"  # a correction may not change the meter


class UsageRejection(Message):
    """A dead letter (``billing.usage.rejected``): reason code, detail and the original payload."""

    schema_: Literal["usage.rejected/v1"] = Field(default="usage.rejected/v1", alias="schema")
    reason: RejectReason
    detail: str
    stage: Literal["ingest", "rating", "ledger"]
    tenant: str | None = None
    event_id: str | None = None
    payload: str = Field(description="The original payload as received (UTF-8, replacement for bad bytes)")
    rejected_at: Timestamp
    source: str
    payload_truncated: bool = Field(default=False, description="True when the payload was larger than a dead "
                                                               "letter keeps (64 KiB) and was cut")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


PaymentKind = Literal["payment_succeeded", "refund_succeeded", "payment_failed", "dispute_opened",
                      "dispute_funds_withdrawn", "dispute_funds_reinstated", "dispute_closed"]
DISPUTE_KINDS = frozenset({"dispute_opened", "dispute_funds_withdrawn", "dispute_funds_reinstated", "dispute_closed"})
DisputeOutcome = Literal["won", "lost", "closed"]


class PaymentNotification(Message):
    """A payment, refund or dispute (chargeback) movement verified with the gateway (``billing.payments``)."""

    schema_: Literal["payment/v1"] = Field(default="payment/v1", alias="schema")
    gateway: str
    gateway_event_id: str
    kind: PaymentKind = Field(
        description="payment_failed: a charge that was pending (e.g. a bank debit still processing) has failed; "
                    "only published for charges that name an invoice (dunning follows it up). dispute_*: the "
                    "customer's bank disputes a payment (a chargeback): opened, funds withdrawn from the merchant's "
                    "gateway balance, funds reinstated, closed with an outcome (dispute_outcome).")
    tenant: str = Field(pattern=TENANT_PATTERN)
    order_id: str
    amount: DecimalStr
    currency: str
    verified_at: Timestamp
    gateway_reference: str | None = Field(
        default=None, max_length=255,
        description="The gateway's id of the money movement (Stripe payment intent or refund, Razorpay payment "
                    "or refund, PayPal capture or refund). Several webhooks may announce one movement (e.g. "
                    "checkout.session.completed and payment_intent.succeeded): ingest publishes one "
                    "notification per (gateway, kind, gateway_reference), and consumers credit once per it.",
        examples=["pi_3PqXyZ"])
    invoice_id: str | None = Field(
        default=None, max_length=255,
        description="The invoice this payment settles (Stripe metadata.invoice_id, written by dunning's off-session "
                    "charges): the ledger marks that invoice paid and grants no credit for it. On a refund: the "
                    "invoice the refunded payment settled, which gets a credit note for the amount refunded.",
        examples=["0b5c2f3e-9c1d-5e4f-8a7b-6c5d4e3f2a1b"])
    refunded_payment: str | None = Field(
        default=None, max_length=255,
        description="On a refund: the gateway's id of the payment it gave back (Stripe payment intent, else charge; "
                    "Razorpay payment; PayPal capture), as in that payment's gateway_reference. The ledger gives an "
                    "invoice's money back only for the payment that paid it: the refund of another payment of the "
                    "invoice (a second payment it rejected) is rejected for reconciliation.",
        examples=["pi_3PqXyZ"])
    dispute: str | None = Field(
        default=None, max_length=255,
        description="On a dispute_* notification: the gateway's id of the dispute (Stripe dp_, Razorpay disp_, PayPal "
                    "PP-D-), the same for every movement of one dispute; gateway_reference names the movement "
                    "(e.g. the dispute id and its outcome for dispute_closed).", examples=["dp_1PqXyZ"])
    disputed_payment: str | None = Field(
        default=None, max_length=255,
        description="On a dispute_* notification: the gateway's id of the payment disputed (Stripe payment intent, "
                    "else charge; Razorpay payment; PayPal capture), as in that payment's gateway_reference.",
        examples=["pi_3PqXyZ"])
    dispute_outcome: DisputeOutcome | None = Field(
        default=None,
        description="On dispute_closed: won (the merchant keeps the money), lost (the bank gave it back to the "
                    "customer: a chargeback) or closed (ended without a chargeback, e.g. an inquiry closed or the "
                    "customer withdrew it).", examples=["lost"])
    dispute_fee: DecimalStr | None = Field(
        default=None,
        description="On a dispute_* notification (since session 14): the fees the gateway has charged the merchant for "
                    "the dispute so far, less what it gave back, in dispute_fee_currency, as its API showed them when "
                    "the movement was verified (Stripe: the fee of the dispute's balance transactions; PayPal: the "
                    "seller's DISPUTE_FEE / CHARGEBACK_FEE / DISPUTE_SETTLEMENT_FEE money movements). The ledger books "
                    "the latest reading as an expense of the operator. Absent: the gateway's API states no fee "
                    "(Razorpay's dispute entity).", examples=["15.00"])
    dispute_fee_currency: str | None = Field(
        default=None, pattern=r"^[A-Z]{3}$",
        description="The ISO 4217 currency of dispute_fee (a gateway account may settle in another currency than the "
                    "payment's); given with dispute_fee, and only then.", examples=["USD"])

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _dispute_fields(self) -> PaymentNotification:
        if self.kind in DISPUTE_KINDS:
            if not self.dispute:
                raise ValueError(f"a {self.kind} notification names its dispute")
            if (self.kind == "dispute_closed") != (self.dispute_outcome is not None):
                raise ValueError("dispute_outcome is given on dispute_closed, and only there")
            if (self.dispute_fee is None) != (self.dispute_fee_currency is None):
                raise ValueError("dispute_fee and dispute_fee_currency are given together")
        elif self.dispute is not None or self.disputed_payment is not None or self.dispute_outcome is not None \
                or self.dispute_fee is not None or self.dispute_fee_currency is not None:
            raise ValueError(f"a {self.kind} notification carries no dispute fields")
        return self


class LedgerCommand(Message):
    """A command for the ledger (``billing.ledger.commands``, key: billing account id).

    ``command_id`` is derived from the cause (uuid5), so the ledger can refuse a second delivery.
    """

    schema_: Literal["ledger.command/v1"] = Field(default="ledger.command/v1", alias="schema")
    command_id: UUID
    kind: str = Field(description="e.g. account.open, credit.grant, usage.debit, catalog.publish")
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    issued_at: Timestamp
    issued_by: str = Field(description="user or service that issued it (audit attribution)")
    payload: dict[str, Any]

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class LedgerEvent(Message):
    """A recorded domain event relayed from the ledger's event store (``billing.ledger.events``).

    ``position`` is the event's notification id in the ledger's store: strictly increasing in recorded
    order, so consumers deduplicate a re-relayed event by it.
    """

    schema_: Literal["ledger.event/v1"] = Field(default="ledger.event/v1", alias="schema")
    position: int
    aggregate_id: UUID
    aggregate_version: int
    type: str = Field(description="Aggregate class and event class, e.g. BillingAccount.UsageDebited")
    tenant: str | None = None
    recorded_at: Timestamp
    data: dict[str, Any]

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def loads_exact(raw: bytes | str) -> Any:
    """JSON decoding that never produces a binary float (numbers with a point or exponent -> Decimal)."""

    def _no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    return json.loads(raw, parse_float=Decimal, parse_constant=_no_constants)


# orjson (the fast JSON of the relay and the projections) reads an integer outside [-2**63, 2**64) as a float
# (2**70 as 1.1805916207174113e+21) and one beyond a double's range not at all, and cannot write one: a text that may
# hold one is decoded (and written) the standard library's way, whose integers are exact at any size. Every integer
# outside that range has at least 19 digits. A number is a run of digits after ``:``, ``,`` or ``[`` (a minus sign
# and spaces left out); digits in a string (a chain hash, an id) follow a quote or a letter, so they do not count,
# except a string's own ``: `` or ``, `` before 19 digits, which only sends the text the exact way. Found in C: every
# digit mapped to 0, those three characters to ``:``, minus and space dropped, then ``:`` and 19 zeros looked for
# (0.6 us for a usage debit's event).
_NUMBERS_AS_ZEROS = bytes.maketrans(b"123456789,[", b"000000000::")
_LONG_NUMBER = b":" + b"0" * 19


def has_long_number(raw: bytes) -> bool:
    """Whether the JSON text ``raw`` may hold an integer of 19 digits or more (one orjson may not read exact)."""
    return _LONG_NUMBER in raw.translate(_NUMBERS_AS_ZEROS, b"- ")
