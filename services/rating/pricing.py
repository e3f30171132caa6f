"""Real-time rating: turning exact prices into integer ledger sub-units, event by event (DESIGN.md 5, 7).

The increment rule. For the cumulative models (flat, per_unit, graduated, volume, stairstep, package) the
charge of a period is ``period_charge(spec, total, allowance) = to_subunits(price(spec, max(0, total -
allowance)).amount)``: the allowance (included quantity) is consumed first, then the rest is priced as a
whole, so tiers stay exact mid-cycle. As each event lands, the wallet is charged
``incremental_charge(spec, before, after, allowance) = period_charge(after) - period_charge(before)``,
where ``before``/``after`` are the period's aggregated quantity without/with the event. Because each side
is rounded to sub-units *before* subtracting, the increments telescope: their sum over the period is
exactly ``period_charge`` of the final total, whatever the order or size of the events. Increments can be
negative (volume pricing crossing into a cheaper band, or a "last value" meter going down): real-time
drawdown then gives the difference back.

Percentage is priced per transaction, not per period: min, max and the fixed fee apply to each event, so
the period's charge is the *sum of per-event fees* (:func:`period_charge_of_events`), and
:func:`period_charge` refuses a percentage spec rather than silently treating the total as one
transaction. Its allowance is a *free transaction volume* in the meter's unit (the meter sums transaction
amounts), consumed first like every other allowance: an event entirely inside it pays nothing, an event
that straddles it pays the fee (fixed part, min and max included) on the part above it. That keeps the
one ``(before, after, allowance)`` signature for every model and needs no event counter. (A count of free
transactions would need the event's ordinal, which the cumulative aggregate does not carry.)

AI token pricing (:func:`ai_token_price`) prices one model call from a per-model table of prices per
million tokens per token class; attribution by model, operation and user is the caller's (the usage
event carries them; projections group by them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Literal

from billing_events.money import MoneyError, parse_decimal, to_subunits
from billing_rating.charge_models import (
    DEFAULT_CREDIT_SCALES,
    PercentageSpec,
    PriceLine,
    PriceResult,
    PriceSpec,
    PriceSpecError,
    amount,
    format_validation_error,
    price,
)
from billing_rating.charge_models.base import EXACT, ZERO, Amount, SpecBase, check_quantity
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

__all__ = [
    "TOKEN_CLASSES",
    "AiModelPrices",
    "AiPriceTable",
    "ai_token_price",
    "incremental_charge",
    "is_per_event",
    "parse_ai_price_table",
    "period_charge",
    "period_charge_of_events",
]


def is_per_event(spec: PriceSpec) -> bool:
    """True for models priced per transaction (percentage) rather than on the period's cumulative total."""
    return isinstance(spec, PercentageSpec)


def period_charge(spec: PriceSpec, total_quantity: Decimal, allowance: Decimal = ZERO) -> int:
    """Sub-units owed for a period whose aggregated quantity is ``total_quantity``, allowance first."""
    if is_per_event(spec):
        raise PriceSpecError(
            "percentage charges are priced per transaction: use incremental_charge per event or "
            "period_charge_of_events, not the fee of a period total"
        )
    total = check_quantity(total_quantity, "total_quantity")
    free = check_quantity(allowance, "allowance")
    billable = EXACT.subtract(total, free) if total > free else ZERO
    return to_subunits(amount(spec, billable))


def incremental_charge(spec: PriceSpec, before: Decimal, after: Decimal, allowance: Decimal = ZERO) -> int:
    """Sub-units to draw down when the period's quantity goes from ``before`` to ``after`` (one event).

    Cumulative models: ``period_charge(after) - period_charge(before)`` (may be negative). Percentage:
    the fee of this one transaction, ``after - before``, on its part above the free ``allowance`` volume.
    """
    if not is_per_event(spec):
        return period_charge(spec, after, allowance) - period_charge(spec, before, allowance)
    start = check_quantity(before, "before")
    end = check_quantity(after, "after")
    if end < start:
        raise MoneyError("a transaction amount cannot be negative: after must not be below before")
    free = check_quantity(allowance, "allowance")
    chargeable = EXACT.subtract(max(end, free), max(start, free))
    if chargeable == 0:
        return 0
    return to_subunits(price(spec, chargeable).amount)


def period_charge_of_events(
    spec: PriceSpec, event_quantities: Iterable[Decimal], allowance: Decimal = ZERO
) -> int:
    """Sub-units owed for a period made of these events (in order), for every model.

    Cumulative models price the summed quantity; percentage sums per-event fees, with the free
    ``allowance`` volume consumed by the earliest events first. Real-time increments add up to this.
    """
    quantities = [check_quantity(q, "event quantity") for q in event_quantities]
    if not is_per_event(spec):
        total = ZERO
        for q in quantities:
            total = EXACT.add(total, q)
        return period_charge(spec, total, allowance)
    remaining = check_quantity(allowance, "allowance")
    charge = 0
    for q in quantities:
        free = min(q, remaining)
        remaining = EXACT.subtract(remaining, free)
        chargeable = EXACT.subtract(q, free)
        if chargeable > 0:
            charge += to_subunits(price(spec, chargeable).amount)
    return charge


# --- AI token pricing ---------------------------------------------------------------------------------

TokenClass = Literal["input", "output", "cached_input"]
TOKEN_CLASSES: tuple[str, ...] = ("input", "output", "cached_input")
_PER_MILLION_SCALE = -6


class AiModelPrices(BaseModel):
    """Prices per *million* tokens of one model, per token class; an absent class has no price."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Amount | None = None
    output: Amount | None = None
    cached_input: Amount | None = None

    @model_validator(mode="after")
    def _some_price(self) -> AiModelPrices:
        if self.input is None and self.output is None and self.cached_input is None:
            raise ValueError(
                "a model needs a price for at least one token class (input, output, cached_input)"
            )
        return self

    def per_token(self, token_class: str) -> Decimal | None:
        per_million: Decimal | None = getattr(self, token_class)
        return None if per_million is None else per_million.scaleb(_PER_MILLION_SCALE, EXACT)


class AiPriceTable(SpecBase):
    """``{"unit": "USD", "models": {"gpt-4o": {"input": "2.50", "output": "10.00", ...}}}``."""

    models: dict[str, AiModelPrices]

    @field_validator("models")
    @classmethod
    def _not_empty(cls, models: dict[str, AiModelPrices]) -> dict[str, AiModelPrices]:
        if not models:
            raise ValueError("models: the table lists no model")
        return models


def parse_ai_price_table(
    data: Mapping[str, Any], *, credit_scales: Mapping[str, int] | None = None
) -> AiPriceTable:
    """Validates an AI price table once (same unit rules and error style as ``parse_spec``)."""
    if not isinstance(data, Mapping):
        raise PriceSpecError("an AI price table must be a mapping with 'unit' and 'models'")
    scales = DEFAULT_CREDIT_SCALES if credit_scales is None else credit_scales
    try:
        return AiPriceTable.model_validate(dict(data), context={"credit_scales": dict(scales)})
    except ValidationError as exc:
        raise format_validation_error(exc) from None


def ai_token_price(
    table: AiPriceTable | Mapping[str, Any], model: str, token_counts: Mapping[str, Any]
) -> PriceResult:
    """The exact price of one model call: ``sum(count * price_per_million / 10**6)`` over token classes.

    ``token_counts`` maps ``input``/``output``/``cached_input`` to whole, non-negative token counts.
    Unknown model, unknown token class or a class the model has no price for (with a non-zero count)
    raise :class:`PriceSpecError`: charging 0 or another class's price silently would be wrong money.
    """
    parsed = table if isinstance(table, AiPriceTable) else parse_ai_price_table(table)
    prices = parsed.models.get(model)
    if prices is None:
        known = ", ".join(sorted(parsed.models))
        raise PriceSpecError(f"unknown AI model {model!r}: the price table has {known}")
    total = ZERO
    lines: list[PriceLine] = []
    for token_class, raw_count in token_counts.items():
        if token_class not in TOKEN_CLASSES:
            raise PriceSpecError(
                f"unknown token class {token_class!r}: expected one of {', '.join(TOKEN_CLASSES)}"
            )
        count = parse_decimal(raw_count, field=f"{token_class} token count")
        if count != count.to_integral_value():
            raise MoneyError(f"{token_class} token count must be a whole number")
        if count == 0:
            continue
        per_token = prices.per_token(token_class)
        if per_token is None:
            raise PriceSpecError(f"AI model {model!r} has no {token_class} price in the table")
        amount = EXACT.multiply(count, per_token)
        total = EXACT.add(total, amount)
        lines.append(
            PriceLine(
                description=f"{model} {token_class} tokens",
                quantity=count,
                unit_amount=per_token,
                amount=amount,
            )
        )
    return PriceResult(total, parsed.unit, tuple(lines))
