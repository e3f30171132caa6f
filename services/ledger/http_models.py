"""Request bodies of the ledger's HTTP API, and the answers some routes document (``RefundAnswer``). Amounts are
decimal strings (or integers), never binary floats.

The models down to ``Body`` validate their routes' bodies. The ones after it (``Described``) describe bodies the
route hands on to its ledger command as sent (``billing_runtime.bodies.described_by``), a field they do not name
refused first (``extra="forbid"``, since session 15: a misspelt field was dropped without a word); the command's checks
answer a bad field with their own reason (``invalid_collection``, ``invalid_command``, ...), so they describe
what those checks accept; their examples are accepted by the routes (tests/unit/subscriptions/test_http_bodies.py).
The commands read them as strictly as the models say (``billing_ledger.payload``): an ``int`` field takes a JSON
integer only (``2.5``, ``"3"`` and ``true`` are refused, never truncated or converted), a ``bool`` field a JSON
boolean only (``"no"`` is refused, never read by its truth), a ``str`` field a string only (never ``"None"``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from billing_events.catalog import CODE, Collection
from billing_events.messages import CODE_PATTERN, RESOURCE_KEY_PATTERN, DecimalStr, SignedDecimalStr
from billing_ledger.domain.account import (
    AUTO_TOP_UP_COOLDOWN_SECONDS_DEFAULT,
    AUTO_TOP_UP_COOLDOWN_SECONDS_MAX,
)
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
# A key naming what a request creates, read back at a URL path (``RESOURCE_KEY_PATTERN``: no '/', at most 128).
ResourceKey = Annotated[str, Field(pattern=RESOURCE_KEY_PATTERN, description="1 to 128 ASCII letters, digits, "
                                   "`.`, `_`, `:` or `-`, starting with a letter or digit (no `/`: it is part of "
                                   "a URL path)")]
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
    request_id: ResourceKey = Field(description="Chosen by the caller (`.../allocations/{resource}/{request_id}`); "
                                              "a retry with the same id changes nothing", examples=["job-7f3a"])
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


class PaidBack(BaseModel):
    unit: str = Field(examples=["USD"])
    amount: str = Field(description="Money to pay back through the gateway, its tax included", examples=["23.80"])
    tax: str = Field(description="The tax in it", examples=["3.80"])


class CreditNoteReference(BaseModel):
    id: UUID = Field(description="The credit note (`GET /v1/accounts/{tenant}/invoices/{id}`)")
    number: str = Field(examples=["CN-2026-000003"])


class RefundAnswer(BaseModel):
    """What a grant refund did: the same answer to its first request (201) and to every retry (200). A retry after more
    than 10,000 later refunds of the account (`REFUNDS_KEPT_MAX`) is answered `{refund_id, tenant, duplicate: true}`."""

    refund_id: UUID
    tenant: str
    grant_id: UUID
    unit: str
    amount: str = Field(description="Credit refunded", examples=["20.00"])
    tax: str = Field(description="The tax given back with it", examples=["3.80"])
    paid_back: PaidBack | None = Field(description="The money to pay back through the gateway; null for credit "
                                                   "with no money booked")
    from_wallet: str = Field(description="Taken from the unspent credit")
    from_breakage: str = Field(description="From credit that lapsed (finance override)")
    from_adjustment: str = Field(description="From what a negative manual adjustment removed (finance override)")
    from_revenue: str = Field(description="From credit already spent (finance override)")
    reason: str
    finance_override: bool
    requested_by: str
    credit_note: CreditNoteReference | None = Field(
        description="The credit note documenting the money and tax paid back (a checkout order's purchase grant: a "
                    "`CN-` note of the order's top-up invoice); null when none was issued (any other grant, or no "
                    "money went back)")


# -- bodies handed on to their command as sent (documented, validated by the command) ---------------------------

At = Annotated[datetime | None, Field(default=None, description="When it takes effect (ISO 8601 with offset); "
                                                                 "default: now. At most 35 days before now and 300 s "
                                                                 "after it (else 422 `at_out_of_range`): nothing is "
                                                                 "scheduled")]
PlanCode = Annotated[str, Field(pattern=CODE, description="Code of a published plan", examples=["starter"])]
PlanVersion = Annotated[int | None, Field(default=None, ge=1, description="A published version of the plan "
                                                                          "(default: its current one)")]
Quantity = Annotated[int, Field(ge=1, description="Units of the plan (seats): its fee and its `resources` are "
                                                  "multiplied by it")]
Text = Annotated[str, Field(min_length=1)]


class Described(BaseModel):
    """A field the model does not name is refused (422 ``invalid-request`` naming it, nothing changed:
    ``described_by``); before session 15 it was dropped, so a misspelt ``quantitty`` bought one seat."""

    model_config = ConfigDict(extra="forbid")


class SubscriptionCreate(Described):
    """A subscription to a published plan version, billed in the account's currency: the plan's own or one of its
    localized `prices` (else refused `currency_mismatch`)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"key": "main", "plan": "starter", "quantity": 3, "trial": False, "time_zone": "Europe/Berlin",
         "collection": "charge_before_access"}]})

    key: ResourceKey = Field(description="The subscription's name in the account (`.../subscriptions/{key}`): 1 to "
                                         "128 ASCII letters, digits, `.`, `_`, `:` or `-`, starting with a letter "
                                         "or digit (else `invalid_command`); a second subscription with it is "
                                         "refused (`subscription_exists`)", examples=["main"])
    plan: PlanCode
    plan_version: PlanVersion = None
    quantity: Quantity = 1
    trial: bool = Field(default=True, description="Start with the plan's `trial_days` when the account is "
                                                  "eligible (false: billed at once)")
    time_zone: str = Field(default="UTC", description="IANA time zone the billing periods turn in",
                           examples=["Europe/Berlin"])
    workspace: ResourceKey | None = Field(
        default=None, description="The workspace (organisation) the account belongs to, joined now if it is not a "
                                  "member yet (another one: `workspace_mismatch`): a trial needs the workspace to "
                                  "have one billing account only, this one", examples=["acme-corp"])
    collection: Collection | None = Field(
        default=None, description="`invoice` (access at once, invoice collected afterwards) or "
                                  "`charge_before_access` (incomplete, no access, until the first invoice is "
                                  "paid); default: the plan's `collection`, else `invoice`")
    at: At = None


class SubscriptionChange(Described):
    """A plan or quantity change, prorated: charges and credits for the rest of the period
    (`GET .../invoice-preview` shows them first)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"quantity": 5}, {"plan": "credits-pro"}]})

    plan: PlanCode | None = Field(default=None, description="The new plan (default: the same plan)")
    plan_version: PlanVersion = None
    quantity: Quantity | None = Field(default=None, description="The new quantity (default: the same)")
    at: At = None


class SubscriptionCancel(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"immediately": True}]})

    immediately: bool = Field(default=False, description="End now, crediting the unused time (false: at the end "
                                                         "of the period)")
    at: At = None


class SubscriptionMoment(Described):
    """Pause or resume: nothing but when."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"at": "2026-11-16T00:00:00+00:00"}]})

    at: At = None


class PaymentMethodAdd(Described):
    """A payment-method token of the gateway (no card data is ever stored). When the gateway is enabled, it is asked
    for the card's brand, last four digits and expiry, which the method keeps (a token it does not know: 422
    ``unknown-payment-method``); ``card`` is never taken from the request."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"method_id": "pm_1Q2w3E4r", "gateway": "stripe", "label": "Visa 4242", "default": True}]})

    method_id: ResourceKey = Field(description="The gateway's token of the method (`.../payment-methods/{method_id}`)")
    gateway: str = Field(default="stripe", description="stripe, razorpay or paypal")
    label: str = Field(default="", description="Shown to people; empty: the card's brand and last digits "
                                               "(Visa 4242) when the gateway told them")
    default: bool = Field(default=False, description="Charge it first (renewals, auto-top-up)")


class TaxProfile(Described):
    """Who the account is for tax: EU VAT ids are checked (and looked up in VIES when configured)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"country": "DE", "business_name": "Acme GmbH", "tax_id": "DE136695976"}]})

    country: str = Field(pattern=r"^[A-Za-z]{2}$", description="ISO 3166-1 alpha-2 country",
                         examples=["DE"])
    subdivision: str | None = Field(default=None, description="ISO 3166-2 subdivision, e.g. US-CA")
    business_name: str | None = None
    tax_id: str | None = Field(default=None, description="VAT or tax id, checked for the country (invalid: "
                                                         "`invalid_vat_id` / `invalid_tax_id`; an EU VAT id of "
                                                         "another member state: `vat_id_country_mismatch`)")


class CheckoutRequest(Described):
    """A top-up: a credit package or an amount, with an optional promotion code."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"package": "credits-10k", "promotion": "WELCOME10", "gateway": "stripe",
         "success_url": "https://app.example.com/billing/done", "cancel_url": "https://app.example.com/billing"}]})

    package: str | None = Field(default=None, description="A credit package of the catalogue")
    amount: DecimalStr | None = Field(default=None, description="An amount in the account's currency (instead of "
                                                            "a package)")
    promotion: str | None = Field(default=None, description="A promotion code")
    gateway: str | None = Field(default=None, description="An enabled gateway (default: the first by name)")
    success_url: Text = Field(description="Where the hosted page sends the customer after paying")
    cancel_url: Text = Field(description="Where it sends them when they give up")


class IdentityVerification(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reference": "vs_1Q2w3E4r", "method": "stripe_identity"}]})

    reference: str = Field(default="", description="The verification provider's reference")
    method: str = Field(default="manual", description="How the identity was verified")
    at: At = None


class GatewayCustomer(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"customer": "cus_Q2w3E4r"}]})

    customer: Text = Field(description="The gateway's customer id", examples=["cus_Q2w3E4r"])


class AlertSettings(Described):
    """Where low-balance alerts go. Replaces the previous settings."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"email": "billing@acme.example", "webhook_url": "https://acme.example/hooks/billing",
         "webhook_secret": "whsec_3f9a"}]})

    email: str | None = None
    webhook_url: str | None = Field(default=None, pattern=r"^https?://",
                                    description="Receives signed JSON alerts (HMAC-SHA256 with the secret)")
    webhook_secret: str | None = Field(default=None, description="Never shown again (answered as `set`)")
    enabled: bool = True


class AutoTopUpRule(Described):
    """Below `threshold`, top up to `target` (the account's currency only) or by one `package`; at most
    `monthly_cap` a calendar month, not twice within the cooldown."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"threshold": "10", "target": "50", "cooldown_seconds": 600, "monthly_cap": "200"}]})

    unit: str | None = Field(default=None, description="The wallet watched (default: the account's currency)")
    threshold: DecimalStr = Field(description="Top up when the balance falls below it")
    target: DecimalStr | None = Field(default=None, description="Exactly one of target or package")
    package: str | None = Field(default=None, description="A credit package giving `unit`")
    cooldown_seconds: int = Field(default=AUTO_TOP_UP_COOLDOWN_SECONDS_DEFAULT, ge=0,
                                  le=AUTO_TOP_UP_COOLDOWN_SECONDS_MAX,
                                  description="Seconds, a JSON integer (1.9, \"60\" or true: invalid_auto_top_up)")
    monthly_cap: DecimalStr = Field(description="At most this much topped up per calendar month")


class LowBalanceThreshold(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"threshold": "20.00"}, {"threshold": None}]})

    unit: str | None = Field(default=None, description="The wallet watched (default: the account's currency)")
    threshold: DecimalStr | None = Field(description="Alert below it; null removes the alert")


class RefundRequestCreate(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"order": "top-up-7f3a", "reason": "bought twice"}]})

    order: Text = Field(description="The paid top-up order (its key)")
    reason: str = ""
    key: ResourceKey | None = Field(default=None, description="The request's key (`.../refund-requests/{key}`; "
                                                              "default: the Idempotency-Key header, else a new one)")


class RefundRequestRejection(Described):
    model_config = ConfigDict(json_schema_extra={"examples": [{"reason": "the credit was used"}]})

    reason: str = ""
