"""``graduated`` (tiered): each band prices only the units that fall in it, at its own rate; blended.

Spec::

    {"model": "graduated", "unit": "USD", "tiers": [
        {"up_to": "100", "unit_amount": "0.10", "flat_amount": "1"},
        {"up_to": "1000", "unit_amount": "0.05", "flat_amount": "2"},
        {"up_to": null, "unit_amount": "0.01"}]}

Bands and fractional quantities. ``up_to`` is an *inclusive* upper bound: band ``i`` covers the half-open
interval ``(up_to[i-1], up_to[i]]`` (the first band ``(0, up_to[0]]``, the last ``(up_to[n-2], inf)``).
Quantity is a continuous measure, so the quantity in band ``i`` is
``clamp(q - up_to[i-1], 0, up_to[i] - up_to[i-1])``: 100.5 units over ``up_to 100`` put 100 in band 1
and 0.5 in band 2. Inclusive versus exclusive bounds changes nothing for the unit part (a point has no
width); it decides the flat fee: a band's ``flat_amount`` is added when *any* quantity falls in it,
i.e. when ``q > up_to[i-1]`` strictly. So exactly 100 units pay band 1's flat fee only; 100.0001 units
also pay band 2's. Quantity 0 costs 0 (no first-band flat fee either).

Non-decreasing in quantity (unit amounts and flat fees are non-negative), so real-time increments are
never negative.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Literal

from .base import EXACT, ZERO, Band, PriceLine, PriceResult, TieredSpec, zero_result


class GraduatedSpec(TieredSpec):
    model: Literal["graduated"]


def _charged_bands(spec: GraduatedSpec, quantity: Decimal) -> Iterator[tuple[Band, Decimal, Decimal]]:
    """Each band the quantity reaches: (band, quantity in it, its amount), in band order."""
    for band in spec.bands:
        if quantity <= band.lower:
            return
        if band.upper is None or quantity < band.upper:
            in_band = EXACT.subtract(quantity, band.lower)
        else:
            in_band = EXACT.subtract(band.upper, band.lower)
        yield band, in_band, EXACT.add(EXACT.multiply(in_band, band.unit_amount), band.flat_amount)


def price(spec: GraduatedSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    total = ZERO
    lines: list[PriceLine] = []
    for band, in_band, amount in _charged_bands(spec, quantity):
        total = EXACT.add(total, amount)
        lines.append(PriceLine(description=band.label, quantity=in_band, unit_amount=band.unit_amount,
                               flat_amount=band.flat_amount, amount=amount))
    return PriceResult(total, spec.unit, tuple(lines))


def amount(spec: GraduatedSpec, quantity: Decimal) -> Decimal:
    """``price(spec, quantity).amount`` without the breakdown (rating's hot path): the same bands, the same
    additions in the same order (``tests/unit/rating`` compares the two on random specs)."""
    total = ZERO
    if quantity != 0:
        for _, _, charged in _charged_bands(spec, quantity):
            total = EXACT.add(total, charged)
    return total
