"""Worked examples for every charge model, the real-time increment rule and AI token pricing.

Each model is checked at zero, on a band boundary (inclusive ``up_to``), just past it, at fractional
quantities and at 10**14 units; bad specs must fail with a message naming the field.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Any

import pytest
from billing_events.money import SUBUNITS_PER_UNIT, MoneyError
from billing_rating.charge_models import (
    FlatSpec,
    GraduatedSpec,
    PriceResult,
    PriceSpecError,
    parse_spec,
    price,
)
from billing_rating.pricing import (
    ai_token_price,
    incremental_charge,
    parse_ai_price_table,
    period_charge,
    period_charge_of_events,
)

D = Decimal
BIG = D(10**14)

TIERS = [
    {"up_to": "100", "unit_amount": "0.10", "flat_amount": "1"},
    {"up_to": "1000", "unit_amount": "0.05", "flat_amount": "2"},
    {"up_to": None, "unit_amount": "0.01"},
]
SPECS: dict[str, dict[str, Any]] = {
    "flat": {"model": "flat", "unit": "USD", "amount": "10"},
    "per_unit": {"model": "per_unit", "unit": "USD", "unit_amount": "0.000002"},
    "graduated": {"model": "graduated", "unit": "USD", "tiers": TIERS},
    "volume": {"model": "volume", "unit": "USD", "tiers": TIERS},
    "stairstep": {
        "model": "stairstep",
        "unit": "USD",
        "steps": [
            {"up_to": "100", "amount": "10"},
            {"up_to": "500", "amount": "20"},
            {"up_to": None, "amount": "50"},
        ],
    },
    "package": {"model": "package", "unit": "USD", "package_size": "100", "package_amount": "5"},
    "percentage": {
        "model": "percentage",
        "unit": "USD",
        "rate": "0.029",
        "fixed_amount": "0.30",
        "min_amount": "0.50",
        "max_amount": "5",
    },
}


def amount(model: str, quantity: Decimal | int | str) -> Decimal:
    return price(parse_spec(SPECS[model]), D(quantity)).amount


def check_lines(result: PriceResult) -> None:
    """Every breakdown adds up, and each line's own arithmetic holds."""
    assert sum((line.amount for line in result.lines), D(0)) == result.amount
    for line in result.lines:
        expected = (line.quantity * (line.unit_amount or 0)) + (line.flat_amount or 0)
        assert expected == line.amount, line


# --- worked examples per model ----------------------------------------------------------------------------

EXAMPLES: list[tuple[str, str | int, str]] = [
    # flat: once if any usage
    ("flat", 0, "0"),
    ("flat", "0.0001", "10"),
    ("flat", 1, "10"),
    ("flat", BIG, "10"),
    # per_unit: 0.000002 USD per token
    ("per_unit", 0, "0"),
    ("per_unit", "0.5", "0.000001"),
    ("per_unit", 1_500_000, "3"),
    ("per_unit", BIG, "200000000"),
    # graduated: 100 x 0.10 + 1, then 900 x 0.05 + 2, then 0.01
    ("graduated", 0, "0"),
    ("graduated", "0.001", "1.0001"),
    ("graduated", 100, "11"),  # on the boundary: band 2's flat fee is not charged
    ("graduated", "100.5", "13.025"),  # 11 + 0.5 x 0.05 + 2
    ("graduated", 1000, "58"),
    ("graduated", 1500, "63"),
    ("graduated", BIG, "1000000000048"),  # 58 + (10**14 - 1000) x 0.01
    # volume: the band of the total prices every unit
    ("volume", 0, "0"),
    ("volume", "0.5", "1.05"),
    ("volume", 100, "11"),  # inclusive: 100 is still band 1
    ("volume", 101, "7.05"),  # band 2: cheaper than 100 units
    ("volume", 1000, "52"),
    ("volume", "1000.5", "10.005"),
    ("volume", BIG, "1000000000000"),
    # stairstep: stacked step fees
    ("stairstep", 0, "0"),
    ("stairstep", "0.1", "10"),
    ("stairstep", 100, "10"),
    ("stairstep", "100.0001", "30"),
    ("stairstep", 500, "30"),
    ("stairstep", 501, "80"),
    ("stairstep", BIG, "80"),
    # package: whole packages of 100 at 5, rounded up
    ("package", 0, "0"),
    ("package", "0.1", "5"),
    ("package", 100, "5"),
    ("package", "100.5", "10"),
    ("package", 250, "15"),
    ("package", BIG, "5000000000000"),
    # percentage: clamp(2.9% x amount + 0.30, 0.50, 5)
    ("percentage", 0, "0"),
    ("percentage", "0.01", "0.50"),  # 0.30029 raised to the minimum
    ("percentage", 5, "0.50"),  # 0.445 raised to the minimum
    ("percentage", 100, "3.20"),
    ("percentage", "162.0689655", "4.99999999950"),  # just under the maximum
    ("percentage", 1000, "5"),  # 29.30 capped
    ("percentage", BIG, "5"),
]


@pytest.mark.parametrize(("model", "quantity", "expected"), EXAMPLES)
def test_worked_example(model: str, quantity: str | int, expected: str) -> None:
    result = price(parse_spec(SPECS[model]), D(quantity))
    assert result.amount == D(expected)
    assert result.unit == "USD"
    check_lines(result)


def test_zero_quantity_has_no_lines_for_every_model() -> None:
    for model, data in SPECS.items():
        result = price(parse_spec(data), D(0))
        assert result.amount == 0 and result.lines == (), model


def test_graduated_breakdown_on_and_past_a_boundary() -> None:
    spec = parse_spec(SPECS["graduated"])
    on = price(spec, D(100))
    assert [(line.description, line.quantity, line.amount) for line in on.lines] == [
        ("tier 1 (up to 100)", D(100), D(11)),
    ]
    past = price(spec, D("1000.25"))
    assert [(line.description, line.quantity) for line in past.lines] == [
        ("tier 1 (up to 100)", D(100)),
        ("tier 2 (100 to 1000)", D(900)),
        ("tier 3 (above 1000)", D("0.25")),
    ]
    assert past.amount == D("58.0025")


def test_stairstep_lines_show_each_reached_step() -> None:
    result = price(parse_spec(SPECS["stairstep"]), D(501))
    assert [(line.description, line.flat_amount) for line in result.lines] == [
        ("step 1 (up to 100)", D(10)),
        ("step 2 (100 to 500)", D(20)),
        ("step 3 (above 500)", D(50)),
    ]
    check_lines(result)


def test_package_with_a_fractional_size() -> None:
    spec = parse_spec({"model": "package", "unit": "USD", "package_size": "2.5", "package_amount": "1.20"})
    assert price(spec, D(5)).amount == D("2.40")  # exactly two packages
    assert price(spec, D("5.01")).amount == D("3.60")  # a third one started
    assert price(spec, D(5)).lines[0].quantity == 2


def test_percentage_breakdown_shows_the_clamp() -> None:
    result = price(parse_spec(SPECS["percentage"]), D(1000))
    assert [line.description for line in result.lines] == [
        "2.9% of 1000",
        "fixed fee",
        "maximum fee 5 applies",
    ]
    assert result.lines[-1].amount == D("-24.30")
    check_lines(result)


def test_percentage_without_bounds_is_unclamped() -> None:
    spec = parse_spec({"model": "percentage", "unit": "USD", "rate": "0.015"})
    assert price(spec, BIG).amount == D("1500000000000")
    assert price(spec, D("0.01")).amount == D("0.00015")


def test_many_digit_products_stay_exact() -> None:
    """15 integer digits times an 18-digit price: the thread's default 28-digit context would round."""
    unit_amount = "0.123456789012345678"
    quantity = D("123456789012345.123456789012345678")
    spec = parse_spec({"model": "per_unit", "unit": "USD", "unit_amount": unit_amount})
    with localcontext(prec=200) as ctx:
        exact = ctx.multiply(quantity, D(unit_amount))
    assert price(spec, quantity).amount == exact


def test_amounts_are_decimal_and_unrounded() -> None:
    result = price(parse_spec(SPECS["per_unit"]), D(3))
    assert isinstance(result.amount, Decimal)
    assert result.amount == D("0.000006")


def test_quantity_as_int_or_string_is_accepted() -> None:
    spec = parse_spec(SPECS["per_unit"])
    assert price(spec, 1_000_000).amount == price(spec, "1000000").amount == D(2)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [1.5, D(-1), D("NaN"), D("Infinity"), "abc", D(10**15), True])
def test_bad_quantity_is_refused(bad: Any) -> None:
    with pytest.raises(MoneyError):
        price(parse_spec(SPECS["per_unit"]), bad)


def test_price_needs_a_parsed_spec() -> None:
    with pytest.raises(PriceSpecError, match="parse_spec"):
        price(SPECS["flat"], D(1))  # type: ignore[arg-type]


# --- units ----------------------------------------------------------------------------------------------


def test_units_currency_and_credit() -> None:
    assert parse_spec({"model": "flat", "unit": "JPY", "amount": "100"}).unit == "JPY"
    assert parse_spec({"model": "flat", "unit": "CREDIT", "amount": "1"}).unit == "CREDIT"
    custom = parse_spec({"model": "flat", "unit": "GPU_HOURS", "amount": "1"}, credit_scales={"GPU_HOURS": 0})
    assert custom.unit == "GPU_HOURS"
    with pytest.raises(PriceSpecError, match="unit: unknown unit 'CREDIT'"):
        parse_spec({"model": "flat", "unit": "CREDIT", "amount": "1"}, credit_scales={})


def test_specs_are_immutable_and_typed() -> None:
    spec = parse_spec(SPECS["graduated"])
    assert isinstance(spec, GraduatedSpec)
    assert isinstance(parse_spec(SPECS["flat"]), FlatSpec)
    with pytest.raises(ValueError):
        spec.unit = "EUR"  # type: ignore[misc]


def test_spec_accepts_decimals_and_ints_and_dumps_strings() -> None:
    spec = parse_spec({"model": "per_unit", "unit": "USD", "unit_amount": D("0.25")})
    assert spec.model_dump(mode="json") == {"model": "per_unit", "unit": "USD", "unit_amount": "0.25"}
    assert parse_spec({"model": "flat", "unit": "USD", "amount": 3}).amount == D(3)  # type: ignore[union-attr]


# --- bad specs ------------------------------------------------------------------------------------------

BAD_SPECS: list[tuple[Any, str]] = [
    ({"model": "tiered", "unit": "USD"}, "model: unknown charge model 'tiered'"),
    ({"unit": "USD", "amount": "1"}, "model: missing"),
    ("flat", "must be a mapping"),
    ({"model": "flat", "unit": "USX", "amount": "1"}, "unit: unknown unit 'USX'"),
    ({"model": "flat", "unit": 840, "amount": "1"}, "unit must be a unit code"),
    ({"model": "flat", "unit": "USD", "amount": "-1"}, "amount must not be negative"),
    (
        {"model": "flat", "unit": "USD", "amount": 1.5},
        "amount must be a decimal string or an integer, not a binary",
    ),
    ({"model": "flat", "unit": "USD", "amount": "ten"}, "amount is not a decimal number"),
    ({"model": "flat", "unit": "USD"}, "amount: missing"),
    ({"model": "flat", "unit": "USD", "amount": "1", "amont": "2"}, "amont: unknown field"),
    ({"model": "per_unit", "unit": "USD", "unit_amount": "NaN"}, "unit_amount is not a decimal number"),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "100"}, {"up_to": "100"}, {"up_to": None}]},
        "tiers[1].up_to (100) must be greater than the previous band's up_to (100)",
    ),
    (
        {"model": "volume", "unit": "USD", "tiers": [{"up_to": "100"}, {"up_to": "50"}, {"up_to": None}]},
        "must be in ascending order and must not overlap",
    ),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "100"}, {"up_to": "200"}]},
        "tiers[1].up_to: the last band must be open",
    ),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": None}, {"up_to": "200"}, {"up_to": None}]},
        "tiers[0].up_to: only the last band may be open",
    ),
    ({"model": "graduated", "unit": "USD", "tiers": []}, "tiers: at least one band is required"),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "0"}, {}]},
        "tiers[0].up_to must be greater than zero",
    ),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": None, "unit_amount": "-0.1"}]},
        "tiers[0].unit_amount must not be negative",
    ),
    (
        {"model": "volume", "unit": "USD", "tiers": [{"up_to": None, "flat_amount": -5}]},
        "tiers[0].flat_amount must not be negative",
    ),
    (
        {"model": "graduated", "unit": "USD", "tiers": [{"up_to": None, "price": "1"}]},
        "tiers[0].price: unknown field",
    ),
    (
        {
            "model": "stairstep",
            "unit": "USD",
            "steps": [{"up_to": "10", "amount": "1"}, {"up_to": "5", "amount": "1"}],
        },
        "steps[1].up_to (5) must be greater",
    ),
    ({"model": "stairstep", "unit": "USD", "steps": [{"up_to": None}]}, "steps[0].amount: missing"),
    (
        {"model": "package", "unit": "USD", "package_size": "0", "package_amount": "1"},
        "package_size must be greater",
    ),
    ({"model": "percentage", "unit": "USD", "rate": "2.9"}, "rate is a fraction"),
    ({"model": "percentage", "unit": "USD", "rate": "-0.01"}, "rate must not be negative"),
    (
        {"model": "percentage", "unit": "USD", "rate": "0.01", "min_amount": "2", "max_amount": "1"},
        "min_amount (2) must not exceed max_amount (1)",
    ),
    ({"model": "per_unit", "unit": "USD", "unit_amount": "1" + "0" * 20}, "unit_amount is too large"),
]


@pytest.mark.parametrize(("data", "message"), BAD_SPECS)
def test_bad_spec_is_refused_with_a_clear_message(data: Any, message: str) -> None:
    with pytest.raises(PriceSpecError) as info:
        parse_spec(data)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_bad_spec_lists_every_problem() -> None:
    with pytest.raises(PriceSpecError) as info:
        parse_spec({"model": "flat", "unit": "XXX1", "amount": "-1"})
    assert len(info.value.problems) == 2
    assert any(p.startswith("unit:") for p in info.value.problems)
    assert any(p.startswith("amount ") for p in info.value.problems)


# --- pricing.py: period and incremental charges -----------------------------------------------------------


def test_period_charge_consumes_the_allowance_first() -> None:
    spec = parse_spec(SPECS["graduated"])
    # 150 units with 50 free: priced as 100 units -> 11 USD
    assert period_charge(spec, D(150), D(50)) == 11 * SUBUNITS_PER_UNIT
    assert period_charge(spec, D(50), D(50)) == 0
    assert period_charge(spec, D(10), D(50)) == 0


def test_period_charge_rounds_half_up_to_subunits() -> None:
    spec = parse_spec({"model": "per_unit", "unit": "USD", "unit_amount": "0.0000000015"})
    assert period_charge(spec, D(1)) == 2  # 1.5 sub-units, half-up
    assert period_charge(spec, D(3)) == 5  # 4.5 -> 5


def test_incremental_charges_on_graduated() -> None:
    spec = parse_spec(SPECS["graduated"])
    assert incremental_charge(spec, D(0), D(100)) == 11 * SUBUNITS_PER_UNIT
    # the first unit past the boundary carries band 2's flat fee
    assert incremental_charge(spec, D(100), D(101)) == D("2.05") * SUBUNITS_PER_UNIT


def test_volume_increment_is_negative_at_a_boundary() -> None:
    spec = parse_spec(SPECS["volume"])
    assert period_charge(spec, D(100)) == 11 * SUBUNITS_PER_UNIT
    assert period_charge(spec, D(101)) == D("7.05") * SUBUNITS_PER_UNIT
    assert incremental_charge(spec, D(100), D(101)) == -D("3.95") * SUBUNITS_PER_UNIT


def test_sub_cent_token_usage_accumulates_exactly() -> None:
    spec = parse_spec(SPECS["per_unit"])  # 0.000002 USD per token
    increments = [incremental_charge(spec, D(n), D(n + 1)) for n in range(10)]
    assert increments == [2000] * 10


def test_percentage_is_priced_per_event() -> None:
    spec = parse_spec(SPECS["percentage"])
    # two 100 USD transactions: 3.20 each, not the fee of one 200 USD transaction (6.10 capped to 5)
    assert incremental_charge(spec, D(0), D(100)) == D("3.20") * SUBUNITS_PER_UNIT
    assert incremental_charge(spec, D(100), D(200)) == D("3.20") * SUBUNITS_PER_UNIT
    assert period_charge_of_events(spec, [D(100), D(100)]) == D("6.40") * SUBUNITS_PER_UNIT
    with pytest.raises(PriceSpecError, match="per transaction"):
        period_charge(spec, D(200))


def test_percentage_allowance_is_a_free_transaction_volume() -> None:
    spec = parse_spec(SPECS["percentage"])
    allowance = D(150)
    assert incremental_charge(spec, D(0), D(100), allowance) == 0  # entirely free
    # 100 more: 50 free, 50 charged -> 2.9% x 50 + 0.30 = 1.75
    assert incremental_charge(spec, D(100), D(200), allowance) == D("1.75") * SUBUNITS_PER_UNIT
    assert period_charge_of_events(spec, [D(100), D(100)], allowance) == D("1.75") * SUBUNITS_PER_UNIT
    with pytest.raises(MoneyError):
        incremental_charge(spec, D(200), D(100))


# --- pricing.py: AI tokens ------------------------------------------------------------------------------

AI_TABLE = {
    "unit": "USD",
    "models": {
        "gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"},
        "text-embedding-3-small": {"input": "0.02"},
    },
}


def test_ai_token_price_per_class() -> None:
    result = ai_token_price(AI_TABLE, "gpt-4o", {"input": 1000, "output": 500, "cached_input": 2000})
    assert result.amount == D("0.01")  # 0.0025 + 0.005 + 0.0025
    assert result.unit == "USD"
    assert [(line.description, line.unit_amount) for line in result.lines] == [
        ("gpt-4o input tokens", D("0.0000025")),
        ("gpt-4o output tokens", D("0.00001")),
        ("gpt-4o cached_input tokens", D("0.00000125")),
    ]
    check_lines(result)


def test_ai_token_price_with_a_parsed_table_and_huge_counts() -> None:
    table = parse_ai_price_table(AI_TABLE)
    result = ai_token_price(table, "gpt-4o", {"output": BIG})
    assert result.amount == D(1_000_000_000)
    assert ai_token_price(table, "gpt-4o", {"input": 0}).amount == 0


def test_ai_token_price_refusals() -> None:
    with pytest.raises(PriceSpecError, match="unknown AI model 'gpt-5'"):
        ai_token_price(AI_TABLE, "gpt-5", {"input": 1})
    with pytest.raises(PriceSpecError, match="unknown token class 'reasoning'"):
        ai_token_price(AI_TABLE, "gpt-4o", {"reasoning": 1})
    with pytest.raises(PriceSpecError, match="no output price"):
        ai_token_price(AI_TABLE, "text-embedding-3-small", {"output": 1})
    with pytest.raises(MoneyError):
        ai_token_price(AI_TABLE, "gpt-4o", {"input": 1.0})
    with pytest.raises(MoneyError, match="whole number"):
        ai_token_price(AI_TABLE, "gpt-4o", {"input": "1.5"})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"unit": "USD", "models": {}}, "models: the table lists no model"),
        ({"unit": "USD", "models": {"m": {}}}, "needs a price for at least one token class"),
        ({"unit": "USD", "models": {"m": {"input": 2.5}}}, "models.m.input must be a decimal string"),
        ({"unit": "USD", "models": {"m": {"inputs": "1"}}}, "models.m.inputs: unknown field"),
        ({"unit": "EURO", "models": {"m": {"input": "1"}}}, "unit: unknown unit 'EURO'"),
    ],
)
def test_bad_ai_price_table(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PriceSpecError) as info:
        parse_ai_price_table(data)
    assert message in str(info.value)
