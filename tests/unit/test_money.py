from decimal import Decimal

import pytest
from billing_events.money import (
    SUBUNITS_PER_UNIT,
    MoneyError,
    credit_unit,
    currency,
    format_subunits,
    from_subunits,
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


@pytest.mark.parametrize("bad", [0.1, float("nan"), "1e400", "NaN", "Infinity", "-1", "abc", True, None])
def test_parse_decimal_refuses_floats_and_nonsense(bad: object) -> None:
    with pytest.raises(MoneyError):
        parse_decimal(bad)


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


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_subunits_round_trip(n: int) -> None:
    assert to_subunits(from_subunits(n)) == n
    assert from_subunits(n) * SUBUNITS_PER_UNIT == n
