"""How the ledger shows an amount of sub-units: exact, at least the unit's minor digits (docs/money.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billing_events.money import MoneyError, Unit, credit_unit, currency, format_subunits, is_currency_code

# Credit types whose catalogue scale is not known to the caller are shown with this many digits at least.
CREDIT_DIGITS_SHOWN_MIN = 2


def credit_scales(credit_units: Mapping[str, Any] | None) -> dict[str, int]:
    """The catalogue's ``credit_units`` (code -> {"scale", ...}) as code -> scale (2 when a spec has none)."""
    return {code: int((spec or {}).get("scale", CREDIT_DIGITS_SHOWN_MIN)) for code, spec in (credit_units or {}).items()}


def shown_unit(unit: str, scales: Mapping[str, int] | None = None) -> Unit:
    """``unit`` with the digits it is shown with: ISO 4217's minor unit for a currency (USD 2, KWD 3, JPY 0), the
    catalogue's scale for a credit type in ``scales``, else ``CREDIT_DIGITS_SHOWN_MIN``."""
    try:
        if is_currency_code(unit):
            return currency(unit)
        return credit_unit(unit, (scales or {}).get(unit, CREDIT_DIGITS_SHOWN_MIN))
    except MoneyError:
        return credit_unit("CREDIT", CREDIT_DIGITS_SHOWN_MIN)


def show(subunits: int, unit: str, scales: Mapping[str, int] | None = None) -> str:
    """``95.40`` for 95.4 USD, ``95.399998`` when sub-minor value exists: never rounded. ``scales``: the
    catalogue's credit scales (``credit_scales``), for a credit type shown at its own scale."""
    return format_subunits(subunits, shown_unit(unit, scales))
