"""``stairstep``: each band the quantity reaches adds its flat fee; the fees of reached bands stack.

Spec::

    {"model": "stairstep", "unit": "USD", "steps": [
        {"up_to": "100", "amount": "10"},
        {"up_to": "500", "amount": "20"},
        {"up_to": null, "amount": "50"}]}

Band ``i`` covers ``(up_to[i-1], up_to[i]]`` (inclusive upper bounds, first band ``(0, up_to[0]]``) and is
*reached* when ``q > up_to[i-1]`` strictly: 0 units cost 0, any quantity in ``(0, 100]`` costs 10,
exactly 100 still 10, 100.0001 costs 30 (10 + 20), anything above 500 costs 80. Fractional quantities
need no special rule: reaching is a comparison. Non-decreasing in quantity (fees are non-negative).
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from .base import (
    EXACT,
    ZERO,
    Amount,
    Band,
    PositiveDecimal,
    PriceLine,
    PriceResult,
    SpecBase,
    build_bands,
    check_bounds,
    quantity_in_band,
    zero_result,
)


class Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: PositiveDecimal | None = None
    amount: Amount


class StairstepSpec(SpecBase):
    model: Literal["stairstep"]
    steps: tuple[Step, ...]

    @field_validator("steps")
    @classmethod
    def _ordered_and_open(cls, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        check_bounds([s.up_to for s in steps], "steps")
        return steps

    @cached_property
    def bands(self) -> tuple[Band, ...]:
        """Pre-built bands (lower bound, fee, label); see ``TieredSpec.bands`` for why a cached_property."""
        return build_bands("step", [(s.up_to, ZERO, s.amount) for s in self.steps])

    def model_post_init(self, context: Any, /) -> None:
        self.bands  # noqa: B018 - build once, eagerly


def price(spec: StairstepSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    total = ZERO
    lines: list[PriceLine] = []
    for band in spec.bands:
        if quantity <= band.lower:
            break
        total = EXACT.add(total, band.flat_amount)
        lines.append(
            PriceLine(
                description=band.label,
                quantity=quantity_in_band(quantity, band),
                flat_amount=band.flat_amount,
                amount=band.flat_amount,
            )
        )
    return PriceResult(total, spec.unit, tuple(lines))
