"""``percentage``: a fee on a transaction amount, ``clamp(rate * amount + fixed_amount, min, max)``.

Spec::

    {"model": "percentage", "unit": "USD", "rate": "0.029", "fixed_amount": "0.30",
     "min_amount": "0.50", "max_amount": "5"}

``rate`` is a *fraction* (0.029 is 2.9 %); a rate above 1 is refused as a probable percent-for-fraction
mistake. ``fixed_amount`` defaults to 0; ``min_amount``/``max_amount`` are optional and, when both are
given, ``min_amount <= max_amount``.

The quantity given to :func:`price` is the transaction amount of *one* event: the fee is per transaction,
so min, max and the fixed fee apply to each transaction, and a period's charge is the sum of per-event
fees, not the fee of the summed amounts (see ``billing_rating.pricing``). A zero amount is no transaction
and costs 0 (no fixed fee, no minimum), as for every other model.

The breakdown has a percentage line, a fixed-fee line and, when the clamp bites, an adjustment line, so
the lines always sum to the amount.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import Literal, Self

from pydantic import field_validator, model_validator

from .base import EXACT, ONE, ZERO, Amount, PriceLine, PriceResult, SpecBase, decimal_text, zero_result

_HUNDRED = Decimal(100)


class PercentageSpec(SpecBase):
    model: Literal["percentage"]
    rate: Amount
    fixed_amount: Amount = ZERO
    min_amount: Amount | None = None
    max_amount: Amount | None = None

    @field_validator("rate")
    @classmethod
    def _fraction(cls, rate: Decimal) -> Decimal:
        if rate > 1:
            raise ValueError(
                f"rate is a fraction of the transaction amount (0.029 means 2.9%), got {decimal_text(rate)}"
            )
        return rate

    @model_validator(mode="after")
    def _min_below_max(self) -> Self:
        if self.min_amount is not None and self.max_amount is not None and self.min_amount > self.max_amount:
            raise ValueError(
                f"min_amount ({decimal_text(self.min_amount)}) must not exceed "
                f"max_amount ({decimal_text(self.max_amount)})"
            )
        return self

    @cached_property
    def percent_label(self) -> str:
        """``2.9%``: computed once per spec, not per transaction (the hot path)."""
        return f"{decimal_text(EXACT.multiply(self.rate, _HUNDRED))}%"


def price(spec: PercentageSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    variable = EXACT.multiply(quantity, spec.rate)
    raw = EXACT.add(variable, spec.fixed_amount)
    fee = raw
    if spec.min_amount is not None and fee < spec.min_amount:
        fee = spec.min_amount
    if spec.max_amount is not None and fee > spec.max_amount:
        fee = spec.max_amount
    lines = [
        PriceLine(
            description=f"{spec.percent_label} of {decimal_text(quantity)}",
            quantity=quantity,
            unit_amount=spec.rate,
            amount=variable,
        ),
        PriceLine(
            description="fixed fee", quantity=ONE, flat_amount=spec.fixed_amount, amount=spec.fixed_amount
        ),
    ]
    if fee != raw:
        which = "minimum" if fee > raw else "maximum"
        adjustment = EXACT.subtract(fee, raw)
        lines.append(
            PriceLine(
                description=f"{which} fee {decimal_text(fee)} applies",
                quantity=ONE,
                flat_amount=adjustment,
                amount=adjustment,
            )
        )
    return PriceResult(fee, spec.unit, tuple(lines))
