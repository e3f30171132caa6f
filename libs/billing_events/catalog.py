"""The catalogue document: the contract between authoring (CLI, rating's admin routes), the ledger (which
records it as immutable versions) and its readers (ingest, rating, projections).

Price specs stay plain mappings here: their meaning and validation belong to rating's charge models
(``billing_rating.charge_models.parse_spec``), which every authoring path runs before publishing.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    computed_field,
    model_validator,
)
from pydantic_core import to_json
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError as StdnumError

from billing_events.money import (
    RATING_CONTEXT,
    MoneyError,
    billed_step,
    credit_unit,
    currency,
    is_billable,
    is_currency_code,
    parse_decimal,
)
from billing_events.topics import RECORD_BYTES_MAX

CODE = r"^[a-z][a-z0-9_.-]{0,63}$"
# The largest catalogue: its document as published (``CatalogDocument.model_dump(mode="json")``, every default filled
# in, the ``catalog.publish`` command's payload), in compact UTF-8 JSON. The document travels as one Kafka record twice,
# the command on billing.ledger.commands and the ledger's ``Catalog.Published`` event on billing.ledger.events (which
# rating and ingest read it from), each at most ``RECORD_BYTES_MAX``. The event carries the document as stored (each
# plan's content and version number) and names each new plan version again by code (``new_plan_versions``): a few
# percent more than the document, most with many small plans of long codes (the worst case at this limit, 2,928 plans
# of 64-character codes, is an event of 830,585 bytes: ``tests/unit/ledger/test_catalogue_size.py``). 768 KiB leaves
# 256 KiB of the record for that and the envelopes. Catalogues are a few KB; a larger one is refused before it is sent
# (HTTP 413 ``catalog-too-large``, the CLI, and the ledger's ``catalog_too_large`` for a command sent past them): sent,
# Kafka refused the command after rating had validated it (HTTP 500), or the event stopped the ledger's relay.
CATALOG_DOCUMENT_BYTES_MAX = 786_432


def _amount(value: Any) -> Decimal:
    try:
        return parse_decimal(value, field="amount")
    except MoneyError as exc:
        raise ValueError(str(exc)) from exc


Amount = Annotated[Decimal, BeforeValidator(_amount), PlainSerializer(str, return_type=str)]
Aggregation = Literal["sum", "count", "max", "last", "unique_count"]
OveragePolicy = Literal["overage", "block"]
LatePolicy = Literal["reject", "next_period", "adjust"]
Cadence = Literal["month", "quarter", "year"]
Collection = Literal["invoice", "charge_before_access"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreditUnitDef(_Model):
    scale: int = Field(default=2, ge=0, le=9, description="Digits shown after the point")
    list_price: Amount | None = Field(default=None, description="Price of one credit in `currency`")
    currency: str | None = Field(default=None, description="ISO 4217 currency of `list_price` (default: the "
                                                           "plan's own currency)")
    list_prices: dict[str, Amount] = Field(
        default_factory=dict, description="Price of one credit in other currencies (credits used beyond the "
                                          "prepaid ones are billed at it on invoices in that currency)")

    @model_validator(mode="after")
    def _valid_currencies(self) -> CreditUnitDef:
        for code in (*([self.currency] if self.currency else []), *self.list_prices):
            currency(code)
        return self

    def price_in(self, money: str, own: str | None = None) -> Decimal | None:
        """The price of one credit on an invoice in ``money`` (None: not priced in it). A ``list_price`` without
        ``currency`` is in ``own`` (the plan's own currency), or in any currency when that is not known."""
        if money in self.list_prices:
            return Decimal(self.list_prices[money])
        if self.list_price is not None and (self.currency or own or money) == money:
            return Decimal(self.list_price)
        return None


class MeterDef(_Model):
    """A meter: what is counted and how a period's events aggregate into one quantity."""

    code: str = Field(pattern=CODE)
    name: str = ""
    unit_of_measure: str = "unit"
    usage_type: str = Field(default="", description="Reporting category, e.g. compute, storage, ai")
    aggregation: Aggregation = "sum"
    value_property: str | None = Field(
        default=None, description="unique_count: the property whose distinct values are counted")
    filters: dict[str, list[str]] = Field(
        default_factory=dict, description="Only events whose property is one of the listed values count")
    group_by: list[str] = Field(default_factory=list, description=(
        "Properties that split the quantity into groups (one usage line and running total per group); the allowance "
        "and the tiers apply once to the meter's total over all its groups"))
    required_properties: list[str] = Field(default_factory=list)
    price: dict[str, Any] | None = Field(default=None, description="List price when no plan prices the meter")
    ai_prices: dict[str, Any] | None = Field(
        default=None, description="AI model price table: per model, per token class, per million tokens")
    included: Amount = Field(default=Decimal(0), description="Allowance per period under the list price")
    overage_policy: OveragePolicy = "overage"
    late_policy: LatePolicy = "next_period"

    @model_validator(mode="after")
    def _consistent(self) -> MeterDef:
        if self.aggregation == "unique_count" and not self.value_property:
            raise ValueError(f"meter {self.code!r}: unique_count needs value_property")
        if self.price is not None and self.ai_prices is not None:
            raise ValueError(f"meter {self.code!r}: give either price or ai_prices, not both")
        if self.ai_prices is not None and self.aggregation != "sum":
            raise ValueError(f"meter {self.code!r}: AI token meters aggregate by sum")
        return self


class PlanCharge(_Model):
    meter: str = Field(pattern=CODE)
    price: dict[str, Any]
    included: Amount = Decimal(0)
    overage_policy: OveragePolicy = "overage"


class RecurringCredit(_Model):
    unit: str
    amount: Amount
    cadence: Cadence = Field(default="month", description="Must be the plan's cadence: one grant per billed period")
    priority: int = 0
    rollover: bool = False
    rollover_cap: Amount | None = None
    scope: list[str] | None = None


def _local_price(value: Any) -> Any:
    # `prices: {EUR: "27.00"}` is short for `prices: {EUR: {base_fee: "27.00"}}`.
    return {"base_fee": value} if isinstance(value, (str, int, Decimal)) else value


class LocalPrice(_Model):
    """A plan's prices in another currency than its own (price localization, seed 002): a subscription of an
    account in that currency is billed in it, at these amounts (no exchange rate is ever applied)."""

    base_fee: Amount
    minimum_spend: Amount | None = Field(default=None, description="Required when the plan has a minimum_spend")


LocalPriceIn = Annotated[LocalPrice, BeforeValidator(_local_price, json_schema_input_type=LocalPrice | str | int)]


class PlanDef(_Model):
    """A plan. Publishing changed content under an existing code creates the next version."""

    code: str = Field(pattern=CODE)
    name: str
    version: int | None = Field(default=None, description="Assigned by the ledger when published")
    cadence: Cadence = "month"
    currency: str = Field(description="ISO 4217 currency of `base_fee` and `minimum_spend`")
    base_fee: Amount = Field(default=Decimal(0), description="Per period and unit of quantity, billed in advance")
    charges: list[PlanCharge] = Field(default_factory=list)
    recurring_credits: list[RecurringCredit] = Field(default_factory=list)
    trial_days: int = Field(default=0, ge=0, le=365)
    resources: dict[str, int] = Field(default_factory=dict,
                                      description="Seat-like capacity per unit of quantity, e.g. users: 5")
    minimum_spend: Amount | None = Field(
        default=None, description="Minimum commitment on usage per period, in `currency`: a renewal invoice "
                                  "whose usage lines total less bills the shortfall (prorated to the billed time)")
    prices: dict[str, LocalPriceIn] = Field(
        default_factory=dict, description="Localized prices by ISO 4217 currency, beside `currency`/`base_fee`: "
                                          "`{EUR: {base_fee: \"27.00\", minimum_spend: \"45.00\"}}`, or `{EUR: "
                                          "\"27.00\"}` for the fee alone")
    collection: Collection | None = Field(
        default=None, description="Default collection of its subscriptions (a subscription may say otherwise): "
                                  "`invoice` (access at once, invoice collected afterwards; the default) or "
                                  "`charge_before_access` (incomplete, no access, until the first invoice is paid)")

    @model_validator(mode="after")
    def _valid_currency(self) -> PlanDef:
        currency(self.currency)
        for code, local in self.prices.items():
            try:
                currency(code)
            except ValueError as exc:
                raise ValueError(f"plan {self.code!r}: prices: {exc}") from None
            if code == self.currency:
                raise ValueError(f"plan {self.code!r}: prices.{code} repeats the plan's own currency (its price "
                                 f"is base_fee)")
            if (self.minimum_spend is None) != (local.minimum_spend is None):
                raise ValueError(f"plan {self.code!r}: prices.{code}.minimum_spend must be given exactly when the "
                                 f"plan has a minimum_spend")
        if self.prices:
            # What the plan bills in its own currency besides the fee cannot be billed in another one without an
            # exchange rate: localized plans price usage and recurring credits in credit units.
            for index, charge in enumerate(self.charges):
                unit = charge.price.get("unit")
                if isinstance(unit, str) and is_currency_code(unit):
                    raise ValueError(f"plan {self.code!r}: charges[{index}] is priced in {unit}, which a "
                                     f"subscription billed in {', '.join(self.prices)} cannot be charged; price "
                                     f"localized plans' charges in a credit unit")
            for index, grant in enumerate(self.recurring_credits):
                if is_currency_code(grant.unit):
                    raise ValueError(f"plan {self.code!r}: recurring_credits[{index}] is in {grant.unit}, which a "
                                     f"subscription billed in {', '.join(self.prices)} cannot be granted; use a "
                                     f"credit unit in localized plans")
        return self

    def content(self) -> dict[str, Any]:
        """What makes two versions different (everything but the version number). The optional settings added
        later are left out while unset, so a plan published before them keeps its content (and version)."""
        content = self.model_dump(mode="json", exclude={"version"})
        for name in ("minimum_spend", "prices", "collection"):
            if not content.get(name):
                content.pop(name, None)
        return content


class CreditPackage(_Model):
    """A prepaid credit package; larger packages may carry bonus credits."""

    code: str = Field(pattern=CODE)
    name: str
    unit: str = Field(description="The credit unit (or a currency for plain top-ups)")

    @model_validator(mode="before")
    @classmethod
    def _drop_derived(cls, data: Any) -> Any:
        # effective_credits and cost_per_credit are derived; a dumped package validates again.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in ("effective_credits", "cost_per_credit")}
        return data

    credits: Amount
    bonus_credits: Amount = Decimal(0)
    price: Amount
    currency: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def effective_credits(self) -> str:
        return str(RATING_CONTEXT.add(self.credits, self.bonus_credits))

    @computed_field  # type: ignore[prop-decorator]
    @property
    def cost_per_credit(self) -> str:
        total = RATING_CONTEXT.add(self.credits, self.bonus_credits)
        if total == 0:
            return "0"
        value = RATING_CONTEXT.divide(self.price, total).quantize(Decimal("0.000001"), context=RATING_CONTEXT)
        return str(value.normalize(context=RATING_CONTEXT))


class TaxRule(_Model):
    """Tax by region: ISO 3166-1 alpha-2 country (``DE``) or country-subdivision (``US-CA``)."""

    region: str = Field(pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
    rate: Amount = Field(description="A fraction: 0.19 is 19 %")
    name: str = ""

    @model_validator(mode="after")
    def _rate_bounded(self) -> TaxRule:
        if self.rate > 1:
            raise ValueError(f"tax rate of {self.region} must be a fraction (0.19 for 19 %)")
        return self


class Seller(_Model):
    """Who issues the invoices: named, with its address and VAT id, on every document finalized after the catalogue
    is published (a VAT invoice names its supplier: EU VAT Directive art. 226(5))."""

    name: str | None = Field(default=None, min_length=1, max_length=200,
                             description="The seller's full name, printed as the issuer of every invoice and credit "
                                         "note (left out: the ledger's BILLING_INVOICE_ISSUER setting)",
                             examples=["Billing GmbH"])
    address: str | None = Field(default=None, min_length=1, max_length=500,
                                description="The seller's postal address, printed under its name (lines separated by "
                                            "newlines or commas)",
                                examples=["Friedrichstr. 1, 10117 Berlin"])
    country: str | None = Field(default=None, pattern=r"^[A-Z]{2}$")
    vat_id: str | None = Field(default=None, min_length=1, max_length=32,
                               description="The seller's VAT id, printed on every invoice finalized after it is "
                                           "published (an EU member state's: checked, with that state's prefix)",
                               examples=["DE136695976"])

    @model_validator(mode="before")
    @classmethod
    def _vat_id_checked(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("vat_id"), str):
            return data
        number, country = data["vat_id"], data.get("country")
        if isinstance(country, str) and country.lower() in eu_vat.MEMBER_STATES - {"xi"}:
            try:
                compact = eu_vat.validate(number)
            except StdnumError as exc:
                raise ValueError(f"seller vat_id {number!r} is not a valid EU VAT id: {exc}") from exc
            prefix = "EL" if country == "GR" else country
            if compact[:2] not in {prefix, country}:
                raise ValueError(f"seller vat_id {number!r} is not a VAT id of {country} (one starts with {prefix})")
            return {**data, "vat_id": compact}
        return {**data, "vat_id": number.strip()}


class PromotionDef(_Model):
    """A promotion code: bonus credit or a discount at top-up time, with validity and usage limits."""

    code: str = Field(pattern=r"^[A-Z0-9][A-Z0-9_-]{1,31}$")
    kind: Literal["bonus_credit", "discount_percent", "discount_amount"]
    value: Amount = Field(description="Credits, a fraction (0.10 = 10 %), or an amount off")
    unit: str | None = Field(default=None, description="Unit of a bonus credit or an amount off")
    valid_from: str | None = Field(default=None, description="ISO 8601 with offset")
    valid_until: str | None = None
    max_redemptions: int | None = Field(default=None, ge=1)
    max_per_account: int | None = Field(default=1, ge=1)
    packages: list[str] | None = Field(default=None, description="Only for these packages (None: any top-up)")


# Validation context of a document read back after it was published (``{STORED: True}``): checks added since
# are not re-run on it, so a reader still loads what was published before them.
STORED = "stored"


def unsupported_credit_cadence(plan: str, index: int, cadence: str, plan_cadence: str) -> str:
    """Recurring credits are granted once per billed period, so their cadence must be the plan's."""
    return (f"plan {plan!r}: recurring_credits[{index}] has cadence {cadence!r} but the plan is billed per "
            f"{plan_cadence}; credits on another cadence than the plan's are not supported (set cadence: "
            f"{plan_cadence!r}, or amount per {plan_cadence})")


def included_credit_above_fee(plan: dict[str, Any]) -> str | None:
    """Why a plan's recurring credit in its own currency cannot be included in its fee (None: it can).

    That credit is part of what the fee pays for (docs/ledger.md "Included credit"): its grant takes its share of
    the fee from ``deferred_revenue`` into the wallet, earned as it is used or lapses. A credit above the fee (per
    period and unit of quantity, both prorated alike) would be funded beyond what was billed, from deferred
    revenue no invoice put there, and its use recognised as revenue nobody paid. Free credit has no consideration
    behind it: it is a promotion (``promotional_expense``), or a credit unit (not money of the fee). So such a
    plan is refused; a credit unit is not checked.
    """
    included = sum((Decimal(str(credit["amount"])) for credit in plan.get("recurring_credits") or []
                    if credit["unit"] == plan["currency"]), Decimal(0))
    fee = Decimal(str(plan.get("base_fee") or "0"))
    if included <= fee:
        return None
    return (f"plan {plan['code']!r} includes {included} {plan['currency']} of recurring credit per period but its "
            f"base_fee is {fee}: the {included - fee} {plan['currency']} above the fee would be paid for by "
            f"nothing; a plan's recurring credits in its own currency must total at most its base_fee (give more "
            f"in a credit unit, or as a promotion)")


def package_priced_above_credit(package: dict[str, Any]) -> str | None:
    """Why a package of credit in its own currency cannot be sold for its price (None: it can).

    A top-up in the currency books the money paid as the credit it grants (net to the wallet, tax to tax
    payable): the credit's value is at most its price, and a package's bonus (or a discount) is promotional.
    Money paid above the credit (a fee, a premium) would be booked in no ledger account, so such a package is
    refused; a credit unit, or a currency other than the price's, has no such face value and is not checked.
    """
    if package["unit"] != package["currency"]:
        return None
    price, credit = Decimal(str(package["price"])), Decimal(str(package["credits"])) + Decimal(
        str(package.get("bonus_credits") or "0"))
    if price <= credit:
        return None
    return (f"package {package['code']!r} costs {price} {package['currency']} but grants {credit} "
            f"{package['unit']} of credit: the {price - credit} {package['currency']} above it would be booked "
            f"nowhere; a package in its own currency must cost at most the credit it grants (credits + "
            f"bonus_credits)")


def price_not_billable(what: str, amount: Any, code: str) -> str | None:
    """Why ``amount`` of currency ``code`` cannot be a price (None: it can).

    A price is billed and charged as it is (a package's price is its checkout total before tax; a plan's fee is a
    line of its invoices), so it must be in what the currency is billed in (``Unit.billed_scale``): whole cents, and
    whole hundredths of the three-decimal currencies, whose card payments take no last digit (Stripe and Razorpay
    refuse 11.906 KWD). A finer price would be charged rounded, another amount than the catalogue says.
    """
    money = currency(code)
    value = Decimal(str(amount))
    if is_billable(value, money):
        return None
    step = billed_step(money)
    lower = (RATING_CONTEXT.divide(value, step).to_integral_value(ROUND_FLOOR) * step).quantize(step)
    return (f"{what} {value} {code} is finer than {code} is billed and charged in ({step}"
            + (": card payments in three-decimal currencies take a last digit of 0" if money.billed_scale
               < money.minor_scale else "") + f"); use {lower} or {lower + step}")


def published_bytes(document: dict[str, Any]) -> int:
    """The size of a published document (``CatalogDocument.model_dump(mode="json")``) as its command carries it."""
    return len(to_json(document))


def too_large_to_publish(document: dict[str, Any]) -> str | None:
    """Why ``document`` (as published) cannot be sent to the ledger: above ``CATALOG_DOCUMENT_BYTES_MAX`` (None: it
    fits). Every path that publishes checks it: rating's route, the CLI and the ledger's ``catalog.publish``."""
    size = published_bytes(document)
    if size <= CATALOG_DOCUMENT_BYTES_MAX:
        return None
    return (f"catalog: {size:,} bytes as published (JSON with every default filled in), more than the "
            f"{CATALOG_DOCUMENT_BYTES_MAX:,} bytes a catalogue may be: it travels to the ledger and back as one Kafka "
            f"record of at most {RECORD_BYTES_MAX:,} bytes")


def nothing_to_publish(document: CatalogDocument) -> str | None:
    """Why ``document`` cannot be published as a catalogue version (None: it can).

    A version replaces the whole catalogue, so a document with no meter, plan or package (``{}``, or only credit
    units, tax rules or a seller) would remove every meter, plan and package: all later usage refused as an unknown
    meter. Every path that publishes refuses it: rating's authoring routes and the CLI (``validate_document``) and
    the ledger's ``catalog.publish`` command, whoever sent it.
    """
    if document.meters or document.plans or document.packages:
        return None
    return ("catalog: no meters, plans or packages; a published version replaces the whole catalogue, so this one "
            "would remove every meter, plan and package")


# A small catalogue in the shape of examples/catalog.yaml (the reference): what a published one looks like.
EXAMPLE: dict[str, Any] = {
    "credit_units": {"CREDIT": {"scale": 2, "list_price": "0.01", "currency": "USD", "list_prices": {"EUR": "0.0092"}}},
    "meters": [
        {"code": "api_calls", "name": "API calls", "unit_of_measure": "call", "usage_type": "api",
         "aggregation": "sum", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.0020"}},
        {"code": "data_operations", "name": "Data operations", "unit_of_measure": "operation", "usage_type": "data",
         "aggregation": "count", "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "0.5"}},
    ],
    "plans": [
        {"code": "starter", "name": "Starter", "cadence": "month", "currency": "USD", "base_fee": "49.00",
         "trial_days": 14, "resources": {"users": 5},
         "charges": [{"meter": "api_calls", "included": "100000",
                      "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.0015"}}],
         "recurring_credits": [{"unit": "CREDIT", "amount": "1000", "cadence": "month"}]},
        {"code": "credits-pro", "name": "Credits Pro", "cadence": "month", "currency": "USD", "base_fee": "99.00",
         "minimum_spend": "50.00", "prices": {"EUR": {"base_fee": "92.00", "minimum_spend": "46.00"}},
         "collection": "charge_before_access",
         "charges": [{"meter": "data_operations",
                      "price": {"model": "per_unit", "unit": "CREDIT", "unit_amount": "0.4"}}],
         "recurring_credits": [{"unit": "CREDIT", "amount": "20000", "cadence": "month"}]},
    ],
    "packages": [{"code": "credits-10k", "name": "10,000 credits", "unit": "CREDIT", "credits": "10000",
                  "bonus_credits": "1000", "price": "95.00", "currency": "USD"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing Inc.", "country": "US"},
}


class CatalogDocument(_Model):
    """A whole catalogue. Published, it is the next immutable version; a plan whose content changed gets the next
    version of its code (subscriptions keep theirs: grandfathering)."""

    model_config = ConfigDict(json_schema_extra={"examples": [EXAMPLE]})

    credit_units: dict[str, CreditUnitDef] = Field(
        default_factory=dict, description="Credit types by code (e.g. CREDIT): scale and list prices")
    meters: list[MeterDef] = Field(default_factory=list, description="What usage is counted, and its list price")
    plans: list[PlanDef] = Field(default_factory=list, description="Subscription plans, codes unique")
    packages: list[CreditPackage] = Field(default_factory=list, description="Prepaid credit packages")
    tax_rules: list[TaxRule] = Field(default_factory=list, description="Tax rates by region")
    promotions: list[PromotionDef] = Field(default_factory=list, description="Promotion codes for top-ups")
    seller: Seller = Field(default_factory=Seller, description="Who issues the invoices (and where, for tax)")

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> CatalogDocument:
        for code, unit in self.credit_units.items():
            credit_unit(code, unit.scale)
        units = set(self.credit_units)
        meters = {m.code for m in self.meters}
        if len(meters) != len(self.meters):
            raise ValueError("meter codes must be unique")
        if len({p.code for p in self.plans}) != len(self.plans):
            raise ValueError("plan codes must be unique within one document")
        for plan in self.plans:
            for charge in plan.charges:
                if charge.meter not in meters:
                    raise ValueError(f"plan {plan.code!r}: unknown meter {charge.meter!r}")
                unit = charge.price.get("unit")
                if (plan.prices and unit in self.credit_units and charge.overage_policy == "overage"
                        and not (info.context or {}).get(STORED)):
                    # Credits used beyond the prepaid ones are billed at the unit's price in the invoice's
                    # currency: a localized plan needs one in each currency it is billed in.
                    missing = [c for c in (plan.currency, *plan.prices)
                               if self.credit_units[unit].price_in(c, plan.currency) is None]
                    if missing:
                        raise ValueError(f"plan {plan.code!r}: {charge.meter} is charged in {unit} with overage, but "
                                         f"{unit} has no list price in {', '.join(missing)} to bill it at; set "
                                         f"credit_units.{unit}.list_prices or overage_policy: block")
            for index, grant in enumerate(plan.recurring_credits):
                if grant.unit not in units and grant.unit != plan.currency:
                    raise ValueError(f"plan {plan.code!r}: unknown credit unit {grant.unit!r}")
                if grant.cadence != plan.cadence and not (info.context or {}).get(STORED):
                    raise ValueError(unsupported_credit_cadence(plan.code, index, grant.cadence, plan.cadence))
            refused = included_credit_above_fee(plan.model_dump(mode="json"))
            if refused and not (info.context or {}).get(STORED):
                raise ValueError(refused)
            prices = [("base_fee", plan.base_fee, plan.currency), ("minimum_spend", plan.minimum_spend, plan.currency)]
            for code, local in plan.prices.items():
                prices += [(f"prices.{code}.base_fee", local.base_fee, code),
                           (f"prices.{code}.minimum_spend", local.minimum_spend, code)]
            for name, amount, code in prices:
                refused = None if amount is None else price_not_billable(f"plan {plan.code!r}: {name}", amount, code)
                if refused and not (info.context or {}).get(STORED):
                    raise ValueError(refused)
        for package in self.packages:
            currency(package.currency)
            if package.unit not in units:
                currency(package.unit)
            refused = package_priced_above_credit(package.model_dump(mode="json")) or price_not_billable(
                f"package {package.code!r}: price", package.price, package.currency)
            if refused and not (info.context or {}).get(STORED):
                raise ValueError(refused)
        for promotion in self.promotions:
            # A bonus is granted in its unit (a credit unit of this document or a currency); an amount off is
            # money. Whether it fits a given order (its currency) is checked when the order is quoted.
            if promotion.unit is not None and not (promotion.kind == "bonus_credit" and promotion.unit in units):
                try:
                    currency(promotion.unit)
                except ValueError as exc:
                    raise ValueError(f"promotion {promotion.code!r}: unknown unit {promotion.unit!r}") from exc
        return self

    def credit_scales(self) -> dict[str, int]:
        return {code: unit.scale for code, unit in self.credit_units.items()}
