"""How the ledger shows an amount of sub-units: exact, at least the unit's minor digits (docs/money.md)."""

from __future__ import annotations

from billing_events.money import MoneyError, credit_unit, currency, format_subunits, is_currency_code

# Credit types are shown with this many digits at least (their catalogue scale is not known here).
CREDIT_DIGITS_SHOWN_MIN = 2


def show(subunits: int, unit: str) -> str:
    """``95.40`` for 95.4 USD, ``95.399998`` when sub-minor value exists: never rounded."""
    try:
        shown = currency(unit) if is_currency_code(unit) else credit_unit(unit, CREDIT_DIGITS_SHOWN_MIN)
    except MoneyError:
        shown = credit_unit("CREDIT", CREDIT_DIGITS_SHOWN_MIN)
    return format_subunits(subunits, shown)
