"""``volume``: the band that contains the total prices *every* unit, plus that band's flat amount.

Spec: same ``tiers`` as ``graduated`` (``{"model": "volume", ...}``).

The band containing ``q`` is the first with ``q <= up_to`` (inclusive upper bounds; band ``i`` covers
``(up_to[i-1], up_to[i]]``): with ``up_to 100``, exactly 100 units are priced at band 1, 100.0001 units
at band 2. Fractional quantities are priced pro rata at the band's rate. Quantity 0 costs 0 (no flat fee).

Not monotone: a cheaper rate in a higher band can make a larger total cost less (101 units at 0.05 cost
less than 100 at 0.10). Real-time drawdown then yields a *negative* increment at the boundary, which gives
the difference back to the wallet; the increments still sum to the period's price exactly.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from .base import EXACT, PriceLine, PriceResult, TieredSpec, zero_result


class VolumeSpec(TieredSpec):
    model: Literal["volume"]


def price(spec: VolumeSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    bands = spec.bands
    band = bands[-1]
    for candidate in bands:
        if candidate.upper is None or quantity <= candidate.upper:
            band = candidate
            break
    amount = EXACT.add(EXACT.multiply(quantity, band.unit_amount), band.flat_amount)
    line = PriceLine(
        description=f"{band.label}: all units",
        quantity=quantity,
        unit_amount=band.unit_amount,
        flat_amount=band.flat_amount,
        amount=amount,
    )
    return PriceResult(amount, spec.unit, (line,))
