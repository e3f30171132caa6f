from decimal import Decimal
from fractions import Fraction

import pytest
from billing_events.money import (
    RATING_CONTEXT,
    SUBUNITS_PER_UNIT,
    MoneyError,
    Unit,
    billed_step,
    credit_unit,
    currency,
    format_subunits,
    from_subunits,
    is_billable,
    minor_subunits,
    parse_decimal,
    round_minor,
    to_subunits,
)
from hypothesis import given
from hypothesis import strategies as st


def test_currency_scales_come_from_iso_4217_data() -> None:
    assert (currency("USD").minor_scale, currency("JPY").minor_scale, currency("KWD").minor_scale) == (2, 0, 3)


@pytest.mark.parametrize("code", ["usd", "US", "ABC", ""])
def test_unknown_currencies_are_refused(code: str) -> None:
    with pytest.raises(MoneyError):
        currency(code)


def test_credit_units_cannot_shadow_a_currency() -> None:
    assert credit_unit("CREDIT").code == "CREDIT"
    with pytest.raises(MoneyError):
        credit_unit("USD")


@pytest.mark.parametrize("bad", [0.1, float("nan"), "1e400", "NaN", "Infinity", "-1", "abc", True, None,
                                 "١٢", "１２", " 12 ", "12\n", "+12", ".5", "12.", "1_000", "1e", ""])
def test_parse_decimal_refuses_floats_and_nonsense(bad: object) -> None:
    with pytest.raises(MoneyError):
        parse_decimal(bad)


@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=-10**14, max_value=10**14, places=9))
def test_parse_decimal_reads_what_str_of_a_decimal_writes(value: Decimal) -> None:
    # Exponents included (1E-7, 0E-9): the services send each other amounts as str(Decimal).
    assert parse_decimal(str(value), allow_negative=True) == value


def test_sub_cent_usage_accumulates_exactly() -> None:
    per_token = Decimal("0.000002")
    assert to_subunits(per_token) == 2000
    assert sum(to_subunits(per_token) for _ in range(1_000_000)) == to_subunits(Decimal(2))


def test_balances_show_exact_values_with_at_least_minor_digits() -> None:
    usd = currency("USD")
    assert format_subunits(to_subunits(Decimal("95.4")), usd) == "95.40"
    assert format_subunits(to_subunits(Decimal("95.399998")), usd) == "95.399998"
    assert format_subunits(0, currency("JPY")) == "0"


def test_invoice_rounding_is_half_up_once() -> None:
    assert round_minor(Decimal("0.005"), currency("USD")) == Decimal("0.01")
    assert round_minor(Decimal("0.0049"), currency("USD")) == Decimal("0.00")
    assert round_minor(Decimal("1.5"), currency("JPY")) == Decimal(2)


def test_three_decimal_currencies_are_billed_in_hundredths_and_shown_in_thousandths() -> None:
    """Card payments take KWD (BHD, JOD, OMR, TND) thousandths with a last digit of 0: an amount billed in them is
    rounded to hundredths, half-up, and still written with the ISO 4217 three decimals."""
    kwd = currency("KWD")
    assert (kwd.minor_scale, kwd.billed_scale) == (3, 2)
    assert str(round_minor(Decimal("0.617"), kwd)) == "0.620"
    assert str(round_minor(Decimal("11.9049"), kwd)) == "11.900"
    assert str(round_minor(Decimal("11.905"), kwd)) == "11.910"
    assert minor_subunits(kwd) == 10 * minor_subunits(credit_unit("FILS", 3))
    assert (billed_step(kwd), is_billable(Decimal("11.91"), kwd), is_billable(Decimal("11.906"), kwd)) == (
        Decimal("0.010"), True, False)
    # Every other unit is billed in its own minor unit.
    assert [currency(code).billed_scale for code in ("USD", "JPY", "HUF")] == [2, 0, 2]
    assert credit_unit("TOKENS", 6).billed_scale == 6
    assert format_subunits(to_subunits(Decimal("11.91")), kwd) == "11.910"


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_subunits_round_trip(n: int) -> None:
    assert to_subunits(from_subunits(n)) == n
    assert from_subunits(n) * SUBUNITS_PER_UNIT == n


def _half_up_subunits(amount: Decimal) -> int:
    """The reference: exact rational arithmetic, half away from zero."""
    scaled = Fraction(amount) * SUBUNITS_PER_UNIT
    magnitude = int(abs(scaled) + Fraction(1, 2))
    return magnitude if scaled >= 0 else -magnitude


@pytest.mark.parametrize(("amount", "subunits"), [
    # Just under half a sub-unit above 3e14 units: 36 significant digits, more than a 28-digit context holds.
    ("300000000000000.000000000499999999999", 300_000_000_000_000_000_000_000),
    ("300000000000000.0000000005", 300_000_000_000_000_000_000_001),
    ("-300000000000000.000000000499999999999", -300_000_000_000_000_000_000_000),
    ("999999999999999.999999999499999999999999", 999_999_999_999_999_999_999_999),
])
def test_to_subunits_rounds_half_up_once_for_large_amounts(amount: str, subunits: int) -> None:
    assert to_subunits(Decimal(amount)) == subunits


@given(st.integers(min_value=-(10**24), max_value=10**24), st.integers(min_value=1, max_value=27))
def test_to_subunits_just_below_half_a_subunit_rounds_down(subunits: int, digits: int) -> None:
    # The amount is built exactly (RATING_CONTEXT), so it really lies just below the rounding boundary.
    sign = 1 if subunits >= 0 else -1
    under_half = RATING_CONTEXT.subtract(Decimal("0.5"), Decimal(1).scaleb(-digits))
    amount = RATING_CONTEXT.add(subunits, sign * under_half).scaleb(-9, context=RATING_CONTEXT)
    assert to_subunits(amount) == _half_up_subunits(amount) == subunits
    half = RATING_CONTEXT.add(subunits, sign * Decimal("0.5")).scaleb(-9, context=RATING_CONTEXT)
    assert to_subunits(half) == subunits + sign


@given(st.integers(min_value=-(10**33), max_value=10**33), st.integers(min_value=0, max_value=27))
def test_to_subunits_matches_exact_half_up_rounding(coefficient: int, exponent: int) -> None:
    amount = Decimal(coefficient).scaleb(-exponent)
    assert to_subunits(amount) == _half_up_subunits(amount)



def _shown_by_decimal(subunits: int, unit: Unit) -> str:
    """format_subunits' rule in Decimal arithmetic: quantized to the unit's minor digits, else normalized."""
    value = from_subunits(subunits)
    minimum = Decimal(1).scaleb(-unit.minor_scale)
    if value == value.quantize(minimum, context=RATING_CONTEXT):
        return str(value.quantize(minimum, context=RATING_CONTEXT))
    return format(value.normalize(context=RATING_CONTEXT), "f")


_SHOWN_UNITS = [currency("USD"), currency("JPY"), currency("KWD"), *(credit_unit("CREDIT", s) for s in range(10))]


@given(st.sampled_from(_SHOWN_UNITS), st.integers(min_value=-(10**24), max_value=10**24), st.booleans())
def test_amounts_are_shown_as_the_decimal_rule_shows_them(unit: Unit, number: int, whole: bool) -> None:
    """Whole minor units take an integer path: the same text as the Decimal rule, for every scale, sign and size."""
    subunits = number * 10 ** (9 - unit.minor_scale) if whole else number
    assert format_subunits(subunits, unit) == _shown_by_decimal(subunits, unit)
    assert format_subunits(0, unit) == _shown_by_decimal(0, unit)
