"""Money, units and rounding: the one place where every money rule of the service set lives.

Rules (DESIGN.md section 5, binding):

* No floats. Every amount is a ``Decimal`` built from a string or an int; a ``float`` is refused.
* A *unit* is either an ISO 4217 currency (minor-unit scale from CLDR via babel, e.g. USD 2, JPY 0,
  KWD 3) or a credit type defined in the catalogue (e.g. ``CREDIT``) with its own scale.
* Ledger postings are integers of **sub-units**: one unit = ``SUBUNITS_PER_UNIT`` (10**9) sub-units for
  every unit, currency or credit. A nano-unit is fine enough for sub-cent usage (0.000002 USD per token is
  2,000 sub-units) and a 64-bit integer still holds 9.2 billion units per balance.
* Rating prices the *cumulative* quantity of a period and converts it to sub-units with
  ``RATING_ROUNDING`` (half-up); increments are differences of those integers, so they telescope exactly.
* Invoices round each line once, to the unit's *billed* scale, with ``INVOICE_ROUNDING`` (half-up). The billed
  scale is the minor scale, except for the three-decimal currencies (BHD, JOD, KWD, LYD, OMR, TND): card payments
  take their thousandths with a last digit of 0 (Stripe, Razorpay), so what is billed or charged in them is rounded
  to hundredths (``CHARGED_DECIMALS_MAX``) and still shown with three decimals (``11.910`` KWD).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Context, Decimal, InvalidOperation
from enum import StrEnum
from functools import lru_cache
from typing import Any

import pycountry
from babel.numbers import get_currency_precision

SUBUNIT_SCALE = 9
SUBUNITS_PER_UNIT = 10**SUBUNIT_SCALE
RATING_ROUNDING = ROUND_HALF_UP
INVOICE_ROUNDING = ROUND_HALF_UP

# The most decimals of a currency amount a customer is billed or charged: card payments in the three-decimal
# currencies (BHD, JOD, KWD, OMR, TND) take thousandths whose last digit is 0 (Stripe's Payment Intents, Checkout and
# Refunds, Razorpay's payments: 5.124 KWD must be 5.120 or 5.130). Checkout figures and invoice lines in them are
# rounded to hundredths, so what is booked is what a gateway can charge (docs/money.md "Billed scale").
CHARGED_DECIMALS_MAX = 2

# Bounds on anything that enters as a decimal (quantities, prices): at most 15 integer digits and 18
# fractional digits. Anything larger is bad input, not a number we should try to bill.
DECIMAL_INT_DIGITS_MAX = 15
DECIMAL_FRACTION_DIGITS_MAX = 18

# High-precision context for rating arithmetic: 60 significant digits, far beyond any bound above.
RATING_CONTEXT = Context(prec=60, rounding=RATING_ROUNDING)
_SUBUNITS_PER_UNIT_DECIMAL = Decimal(1).scaleb(SUBUNIT_SCALE)  # 1E+9: one digit, so the product stays exact

# A decimal string: ASCII digits only (``\\d`` would take any script's digits, "١٢" as 12), nothing around them, an
# optional minus, a fraction with digits after its point. The exponent stays: ``str(Decimal)`` writes one (1E-7,
# 1E+3) in the messages the services send each other, and JSON numbers with one are read as Decimals.
_PLAIN_DECIMAL = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_CREDIT_CODE = re.compile(r"^[A-Z][A-Z0-9_]{1,31}$")


class MoneyError(ValueError):
    """A value that cannot be a quantity or an amount."""


def parse_decimal(value: Any, *, field: str = "value", allow_negative: bool = False) -> Decimal:
    """Parses a decimal from a string (``[-]digits[.digits][e[+-]digits]``, ASCII, nothing around it), an int or a
    Decimal; refuses floats, NaN, infinities, huge values."""
    if isinstance(value, bool):  # an int to Python, never an amount
        raise MoneyError(f"{field} must be a decimal string or an integer, not {str(value).lower()}")
    if isinstance(value, float):
        raise MoneyError(f"{field} must be a decimal string or an integer, not a binary float")
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, Decimal):
        result = value
    elif isinstance(value, str):
        if not _PLAIN_DECIMAL.fullmatch(value):
            raise MoneyError(f"{field} is not a decimal number: {value[:40]!r}")
        try:
            result = Decimal(value)
        except InvalidOperation as exc:  # pragma: no cover - the regex already guards
            raise MoneyError(f"{field} is not a decimal number") from exc
    else:
        raise MoneyError(f"{field} must be a decimal string or an integer")
    if not result.is_finite():
        raise MoneyError(f"{field} must be finite")
    if result < 0 and not allow_negative:
        raise MoneyError(f"{field} must not be negative")
    if result != 0:
        exponent = result.as_tuple().exponent
        assert isinstance(exponent, int)
        if result.adjusted() >= DECIMAL_INT_DIGITS_MAX:
            raise MoneyError(f"{field} is too large (at most {DECIMAL_INT_DIGITS_MAX} integer digits)")
        if exponent < -DECIMAL_FRACTION_DIGITS_MAX and result != result.quantize(
            Decimal(1).scaleb(-DECIMAL_FRACTION_DIGITS_MAX), context=RATING_CONTEXT
        ):
            raise MoneyError(f"{field} has more than {DECIMAL_FRACTION_DIGITS_MAX} fractional digits")
    return result


class UnitKind(StrEnum):
    CURRENCY = "currency"
    CREDIT = "credit"


@dataclass(frozen=True, slots=True)
class Unit:
    """A ledger unit: an ISO 4217 currency or a catalogue-defined credit type."""

    code: str
    kind: UnitKind
    minor_scale: int  # digits after the point shown on invoices and balances (ISO 4217 for a currency)

    def __str__(self) -> str:
        return self.code

    @property
    def billed_scale(self) -> int:
        """Digits an amount billed or charged in this unit keeps (invoice lines, checkout figures, money paid
        back): the minor scale, at most ``CHARGED_DECIMALS_MAX`` for a currency (KWD: 2, USD: 2, JPY: 0)."""
        if self.kind is UnitKind.CURRENCY:
            return min(self.minor_scale, CHARGED_DECIMALS_MAX)
        return self.minor_scale


@lru_cache(maxsize=512)
def currency(code: str) -> Unit:
    """The ISO 4217 currency ``code`` (validated against pycountry, scale from CLDR)."""
    if not isinstance(code, str) or len(code) != 3 or not code.isupper():
        raise MoneyError(f"unknown currency {code!r}: expected an ISO 4217 code such as USD")
    if pycountry.currencies.get(alpha_3=code) is None:
        raise MoneyError(f"unknown currency {code!r}: not in ISO 4217")
    return Unit(code=code, kind=UnitKind.CURRENCY, minor_scale=int(get_currency_precision(code)))


def is_currency_code(code: str) -> bool:
    try:
        currency(code)
    except MoneyError:
        return False
    return True


def credit_unit(code: str, minor_scale: int = 2) -> Unit:
    """A credit type defined in the catalogue (never an ISO 4217 code, so the two cannot be mixed up)."""
    if not _CREDIT_CODE.match(code or ""):
        raise MoneyError(f"invalid credit unit code {code!r}: use 2-32 upper-case letters, digits or _")
    if is_currency_code(code):
        raise MoneyError(f"credit unit code {code!r} clashes with an ISO 4217 currency")
    if not 0 <= minor_scale <= SUBUNIT_SCALE:
        raise MoneyError(f"credit unit scale must be between 0 and {SUBUNIT_SCALE}")
    return Unit(code=code, kind=UnitKind.CREDIT, minor_scale=minor_scale)


def resolve_unit(code: str, credit_scales: dict[str, int] | None = None) -> Unit:
    """A currency if ``code`` is ISO 4217, else a credit unit known in ``credit_scales``."""
    if is_currency_code(code):
        return currency(code)
    scales = credit_scales or {}
    if code in scales:
        return credit_unit(code, scales[code])
    raise MoneyError(f"unknown unit {code!r}: neither ISO 4217 nor a credit type in the catalogue")


def to_subunits(amount: Decimal) -> int:
    """Converts an exact Decimal amount to integer ledger sub-units (half-up at the 9th decimal)."""
    if isinstance(amount, float):
        raise MoneyError("binary floats are refused in money paths")
    # Multiplied in RATING_CONTEXT, not the thread's 28-digit context: there a large amount with many
    # fractional digits was rounded (half-even) before the half-up quantize, off by one sub-unit near 3e14.
    scaled = RATING_CONTEXT.multiply(amount, _SUBUNITS_PER_UNIT_DECIMAL).quantize(
        Decimal(1), rounding=RATING_ROUNDING, context=RATING_CONTEXT)
    return int(scaled)


def from_subunits(subunits: int) -> Decimal:
    """The exact Decimal value of ``subunits`` ledger sub-units."""
    return Decimal(subunits).scaleb(-SUBUNIT_SCALE, context=RATING_CONTEXT)


def minor_subunits(unit: Unit) -> int:
    """The smallest amount of ``unit`` billed or charged (a cent; ten fils of KWD: ``Unit.billed_scale``) in
    sub-units."""
    return 10 ** (SUBUNIT_SCALE - unit.billed_scale)


def billed_step(unit: Unit) -> Decimal:
    """The smallest amount of ``unit`` billed or charged: ``0.01`` USD, ``0.010`` KWD, ``1`` JPY (written with the
    unit's minor digits)."""
    return Decimal(1).scaleb(-unit.billed_scale).quantize(Decimal(1).scaleb(-unit.minor_scale), context=RATING_CONTEXT)


def round_minor(amount: Decimal, unit: Unit) -> Decimal:
    """Rounds once, half-up, to what the unit is billed in (``Unit.billed_scale``: invoice lines, checkout figures),
    written with its minor digits: ``11.9055`` KWD is ``11.910``."""
    rounded = amount.quantize(Decimal(1).scaleb(-unit.billed_scale), rounding=INVOICE_ROUNDING, context=RATING_CONTEXT)
    return rounded.quantize(Decimal(1).scaleb(-unit.minor_scale), context=RATING_CONTEXT)


def charged_floor(amount: Decimal, unit: Unit) -> Decimal:
    """``amount`` rounded down to what ``unit`` is billed and charged in (``Unit.billed_scale``), written with its
    minor digits: ``12.957`` KWD is ``12.950``, a billable amount itself. What a gateway can charge of an amount billed
    before the billed scale existed (an invoice of 12.957 KWD finalized before session 13); the rest, less than one
    step, is the ledger's to write off (docs/money.md "Billed scale")."""
    down = amount.quantize(Decimal(1).scaleb(-unit.billed_scale), rounding=ROUND_FLOOR, context=RATING_CONTEXT)
    return down.quantize(Decimal(1).scaleb(-unit.minor_scale), context=RATING_CONTEXT)


def is_billable(amount: Decimal, unit: Unit) -> bool:
    """Whether ``amount`` is in whole billed minor units of ``unit`` (``11.910`` KWD is, ``11.906`` is not)."""
    return round_minor(amount, unit) == amount


# Sub-units per minor unit of each scale a unit may have (0 .. SUBUNIT_SCALE digits).
_MINOR_STEPS = tuple(10 ** (SUBUNIT_SCALE - digits) for digits in range(SUBUNIT_SCALE + 1))
_PLAIN_SCALE_MAX = 6  # str(Decimal) is plain (no exponent) for every value quantized to at most this many digits


def format_subunits(subunits: int, unit: Unit) -> str:
    """Shows an exact balance: at least the unit's minor digits, more only when sub-minor value exists.

    ``95.4 USD`` -> ``"95.40"``; ``95.399998 USD`` -> ``"95.399998"``. Never rounds.
    """
    minor = unit.minor_scale
    # Whole minor units (the usual) of a scale up to 6 digits: the same text by integer arithmetic, several times faster
    # (a report formats thousands). Finer scales keep the Decimal path: its text of a value below 1e-6 is scientific.
    if minor <= _PLAIN_SCALE_MAX and not subunits % (step := _MINOR_STEPS[minor]):
        digits = str(abs(subunits) // step)
        if minor:
            digits = digits.rjust(minor + 1, "0")
            digits = f"{digits[:-minor]}.{digits[-minor:]}"
        return f"-{digits}" if subunits < 0 else digits
    value = from_subunits(subunits)
    minimum = Decimal(1).scaleb(-unit.minor_scale)
    if value == value.quantize(minimum, context=RATING_CONTEXT):
        return str(value.quantize(minimum, context=RATING_CONTEXT))
    text = format(value.normalize(context=RATING_CONTEXT), "f")
    return text
