"""``per_unit``: every unit at the same price, ``quantity * unit_amount``, exactly.

Spec: ``{"model": "per_unit", "unit": "USD", "unit_amount": "0.000002"}``.
Fractional quantities are priced pro rata (0.5 units cost half a unit). Non-decreasing in quantity.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from .base import EXACT, ZERO, Amount, PriceLine, PriceResult, SpecBase, zero_result


class PerUnitSpec(SpecBase):
    model: Literal["per_unit"]
    unit_amount: Amount


def price(spec: PerUnitSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    amount = EXACT.multiply(quantity, spec.unit_amount)
    line = PriceLine(description="per unit", quantity=quantity, unit_amount=spec.unit_amount, amount=amount)
    return PriceResult(amount, spec.unit, (line,))


def amount(spec: PerUnitSpec, quantity: Decimal) -> Decimal:
    """``price(spec, quantity).amount`` without the breakdown (rating's hot path)."""
    return ZERO if quantity == 0 else EXACT.multiply(quantity, spec.unit_amount)
