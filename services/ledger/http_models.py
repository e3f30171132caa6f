"""Request bodies of the ledger's HTTP API. Amounts are decimal strings (or integers), never binary floats."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from billing_events.messages import CODE_PATTERN, DecimalStr, SignedDecimalStr
from billing_ledger.limits import (
    HOLD_TTL_SECONDS_DEFAULT,
    HOLD_TTL_SECONDS_MAX,
    KEY_CHARS_MAX,
    REASON_CHARS_MAX,
)
from pydantic import BaseModel, ConfigDict, Field

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=KEY_CHARS_MAX, pattern=KEY_PATTERN,
                                      description="Chosen by the caller; a retry with the same key is answered "
                                                  "with the first answer and changes nothing",
                                      examples=["job-7f3a"])]
Reason = Annotated[str, Field(min_length=1, max_length=REASON_CHARS_MAX, description="Why, for the audit trail")]
UnitCode = Annotated[str | None, Field(default=None, min_length=2, max_length=32,
                                       description="ISO 4217 currency or catalogue credit type; default: the "
                                                   "account's currency", examples=["USD"])]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HoldRequest(Body):
    idempotency_key: IdempotencyKey
    amount: DecimalStr = Field(description="Amount to reserve (decimal string)", examples=["12.50"])
    unit: UnitCode = None
    meter: str | None = Field(default=None, pattern=CODE_PATTERN,
                              description="Only credit usable for this meter counts (scoped grants)")
    ttl_seconds: int = Field(default=HOLD_TTL_SECONDS_DEFAULT, ge=1, le=HOLD_TTL_SECONDS_MAX,
                             description="The hold releases itself after this long")


class CaptureRequest(Body):
    amount: DecimalStr = Field(description="Actual amount spent (at most the hold unless allow_overage)",
                               examples=["9.75"])
    allow_overage: bool = Field(default=False, description="Capture more than held: the excess is drawn like "
                                                           "usage, the rest of it goes to receivables")


class AllocationRequest(Body):
    request_id: IdempotencyKey
    resource: str = Field(pattern=CODE_PATTERN, examples=["seats"])
    quantity: int = Field(ge=1, le=10**12, examples=[1])


class CapacityRequest(Body):
    capacity: int = Field(ge=0, le=10**12, description="Pooled capacity of the resource", examples=[10])


class AdjustmentRequest(Body):
    idempotency_key: IdempotencyKey
    amount: SignedDecimalStr = Field(description="Positive adds credit, negative removes it", examples=["-5.00"])
    unit: UnitCode = None
    reason: Reason


class RefundRequest(Body):
    idempotency_key: IdempotencyKey
    grant_id: UUID = Field(description="The purchase grant to refund")
    amount: DecimalStr = Field(examples=["20.00"])
    reason: Reason
    finance_override: bool = Field(default=False, description="Refund credit that was already spent or has "
                                                              "lapsed (finance role only)")
