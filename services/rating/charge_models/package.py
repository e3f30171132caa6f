"""``package``: usage is sold in whole packages; a started package is a whole package.

Spec: ``{"model": "package", "unit": "USD", "package_size": "100", "package_amount": "5"}``.

``packages = ceil(q / package_size)`` computed exactly with integer division and remainder (never a
rounded quotient): 0 units -> 0 packages, 0.1 -> 1, 100 -> 1, 100.5 -> 2. ``package_size`` may itself be
fractional (e.g. 2.5 GB). Non-decreasing in quantity. The breakdown line is
``packages x package_amount`` so ``quantity * unit_amount == amount`` holds on it too.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from .base import (
    EXACT,
    ONE,
    Amount,
    PositiveDecimal,
    PriceLine,
    PriceResult,
    SpecBase,
    decimal_text,
    zero_result,
)


class PackageSpec(SpecBase):
    model: Literal["package"]
    package_size: PositiveDecimal
    package_amount: Amount


def packages_for(quantity: Decimal, package_size: Decimal) -> Decimal:
    """``ceil(quantity / package_size)`` without an inexact division."""
    whole = EXACT.divide_int(quantity, package_size)
    if EXACT.remainder(quantity, package_size) != 0:
        whole = EXACT.add(whole, ONE)
    return whole


def price(spec: PackageSpec, quantity: Decimal) -> PriceResult:
    if quantity == 0:
        return zero_result(spec.unit)
    packages = packages_for(quantity, spec.package_size)
    amount = EXACT.multiply(packages, spec.package_amount)
    line = PriceLine(
        description=(
            f"{decimal_text(quantity)} units in {decimal_text(packages)} "
            f"package(s) of {decimal_text(spec.package_size)}"
        ),
        quantity=packages,
        unit_amount=spec.package_amount,
        amount=amount,
    )
    return PriceResult(amount, spec.unit, (line,))
