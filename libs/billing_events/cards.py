"""What a gateway tells about a saved card, as the ledger records it: brand, last four digits, expiry month/year.

A contract shared by the ledger's outbound gateway adapters (when a method is saved), ingest's webhook adapters
(Stripe's ``payment_method.updated`` / ``payment_method.automatically_updated``) and the ledger's commands. Never
a card number: ``last4`` is exactly four digits, and nothing else of the number is accepted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

BRAND_LENGTH_MAX = 40
EXP_YEAR_MIN = 2000  # a two-digit year (Razorpay's ``27``) is read as 20YY by the adapter that receives it
EXP_YEAR_MAX = 2199
_LAST4 = re.compile(r"^[0-9]{4}$")
_BRAND = re.compile(r"^[a-z0-9][a-z0-9 _-]*$")


class CardDetailsError(ValueError):
    """The card details are not brand + last four digits + expiry month and year."""


def _whole(value: Any, field: str) -> int:
    """An integer from a JSON number or a string of digits (gateways send both); never a bool or a fraction."""
    if isinstance(value, bool):
        raise CardDetailsError(f"{field} must be a whole number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    raise CardDetailsError(f"{field} must be a whole number, not {value!r}")


def card_details(raw: Any) -> dict[str, Any]:
    """The canonical card details ``{brand, last4, exp_month, exp_year}`` from a mapping of them, else
    ``CardDetailsError``. The brand is lower-cased (Stripe ``visa``, Razorpay ``Visa``, PayPal ``VISA``)."""
    if not isinstance(raw, Mapping):
        raise CardDetailsError("card must be an object with brand, last4, exp_month and exp_year")
    unknown = sorted(set(raw) - {"brand", "last4", "exp_month", "exp_year"})
    if unknown:  # above all no number, cvc or holder name: nothing but what the ledger keeps
        raise CardDetailsError(f"card takes only brand, last4, exp_month and exp_year, not {', '.join(unknown)}")
    brand = raw.get("brand")
    if not isinstance(brand, str) or not brand.strip():
        raise CardDetailsError("card brand must be a non-empty string")
    brand = brand.strip().lower()
    if len(brand) > BRAND_LENGTH_MAX or not _BRAND.match(brand):
        raise CardDetailsError(f"card brand {brand[:BRAND_LENGTH_MAX]!r} is not a card brand name")
    last4 = raw.get("last4")
    if not isinstance(last4, str) or not _LAST4.match(last4):
        raise CardDetailsError("card last4 must be exactly the last four digits, as a string")
    month = _whole(raw.get("exp_month"), "card exp_month")
    if not 1 <= month <= 12:
        raise CardDetailsError(f"card exp_month must be 1 to 12, not {month}")
    year = _whole(raw.get("exp_year"), "card exp_year")
    if not EXP_YEAR_MIN <= year <= EXP_YEAR_MAX:
        raise CardDetailsError(f"card exp_year must be a four-digit year ({EXP_YEAR_MIN}-{EXP_YEAR_MAX}), not {year}")
    return {"brand": brand, "last4": last4, "exp_month": month, "exp_year": year}


def four_digit_year(value: Any) -> Any:
    """A two-digit expiry year (``27``, ``"27"``) as 2027; anything else unchanged (``card_details`` checks it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and 0 <= value < 100:
        return 2000 + value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 2:
        return 2000 + int(value.strip())
    return value
