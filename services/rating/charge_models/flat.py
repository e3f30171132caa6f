"""``flat``: a fixed amount, charged once per period when there is any usage at all.

Spec: ``{"model": "flat", "unit": "USD", "amount": "10"}``.
Semantics: quantity 0 -> 0; any quantity > 0 (however small, fractional included) -> ``amount``.
Non-decreasing in quantity; real-time drawdown charges the whole fee with the first event of the period.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from .base import Amount, PriceLine, PriceResult, SpecBase, zero_result


class FlatSpec(SpecBase):
    model: Literal["flat"]
    amount: Amount


def price(spec: FlatSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    line = PriceLine(description="flat fee", quantity=quantity, flat_amount=spec.amount, amount=spec.amount)
    return PriceResult(spec.amount, spec.unit, (line,))
