"""Properties of the pricing engine, checked with hypothesis on random specs and random usage.

* flat, per_unit, graduated, stairstep and package never cost less for more usage;
* volume can (a larger total in a cheaper band), and real-time increments then go negative;
* for every model, the real-time increments of any sequence of events add up *exactly* to the period
  charge, allowances included (percentage: to the sum of per-event fees);
* every breakdown's lines add up to the amount.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_rating.charge_models import PriceSpec, parse_spec, price
from billing_rating.pricing import incremental_charge, is_per_event, period_charge, period_charge_of_events
from hypothesis import example, given, settings
from hypothesis import strategies as st

D = Decimal


def scaled(max_units: int, places: int) -> st.SearchStrategy[Decimal]:
    """Non-negative decimals with ``places`` fractional digits, built from integers (never floats)."""
    return st.integers(min_value=0, max_value=max_units * 10**places).map(lambda n: D(n).scaleb(-places))


amounts = scaled(1000, 6)
quantities = st.one_of(scaled(10_000, 3), scaled(10**14, 0), st.sampled_from([D(0), D(1), D(100), D(1000)]))
small_quantities = scaled(500, 2)


@st.composite
def bounds(draw: st.DrawFn) -> list[Decimal]:
    """Strictly ascending positive band bounds (0 to 4 of them), sometimes fractional."""
    raw = draw(st.lists(st.integers(min_value=1, max_value=200_000), max_size=4, unique=True))
    places = draw(st.sampled_from([0, 1, 2]))
    return [D(n).scaleb(-places) for n in sorted(raw)]


@st.composite
def tiers(draw: st.DrawFn) -> list[dict[str, Any]]:
    ups: list[Decimal | None] = [*draw(bounds()), None]
    return [{"up_to": up, "unit_amount": draw(amounts), "flat_amount": draw(amounts)} for up in ups]


@st.composite
def steps(draw: st.DrawFn) -> list[dict[str, Any]]:
    ups: list[Decimal | None] = [*draw(bounds()), None]
    return [{"up_to": up, "amount": draw(amounts)} for up in ups]


def spec_of(model: str) -> st.SearchStrategy[PriceSpec]:
    unit = st.sampled_from(["USD", "JPY", "KWD", "CREDIT"])
    if model == "flat":
        data = st.fixed_dictionaries({"model": st.just("flat"), "unit": unit, "amount": amounts})
    elif model == "per_unit":
        data = st.fixed_dictionaries({"model": st.just("per_unit"), "unit": unit, "unit_amount": amounts})
    elif model in ("graduated", "volume"):
        data = st.fixed_dictionaries({"model": st.just(model), "unit": unit, "tiers": tiers()})
    elif model == "stairstep":
        data = st.fixed_dictionaries({"model": st.just("stairstep"), "unit": unit, "steps": steps()})
    elif model == "package":
        data = st.fixed_dictionaries(
            {
                "model": st.just("package"),
                "unit": unit,
                "package_size": scaled(1000, 2).filter(lambda d: d > 0),
                "package_amount": amounts,
            }
        )
    else:
        data = percentage_data(unit)
    return data.map(parse_spec)


def percentage_data(unit: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": "percentage",
            "unit": draw(unit),
            "rate": draw(scaled(1, 4)),
            "fixed_amount": draw(scaled(5, 2)),
        }
        low = draw(st.none() | scaled(10, 2))
        high = draw(st.none() | scaled(100, 2))
        if low is not None:
            spec["min_amount"] = low
        if high is not None:
            spec["max_amount"] = high if low is None else max(low, high)
        return spec

    return build()


MONOTONE = ["flat", "per_unit", "graduated", "stairstep", "package"]
ALL = [*MONOTONE, "volume", "percentage"]

monotone_specs = st.sampled_from(MONOTONE).flatmap(spec_of)
any_specs = st.sampled_from(ALL).flatmap(spec_of)


@settings(max_examples=400)
@given(spec=monotone_specs, a=quantities, b=quantities)
def test_monotone_models_never_cost_less_for_more(spec: PriceSpec, a: Decimal, b: Decimal) -> None:
    low, high = min(a, b), max(a, b)
    assert price(spec, low).amount <= price(spec, high).amount


@settings(max_examples=200)
@given(spec=monotone_specs, before=quantities, delta=quantities, allowance=small_quantities)
def test_monotone_models_never_have_negative_increments(
    spec: PriceSpec, before: Decimal, delta: Decimal, allowance: Decimal
) -> None:
    assert incremental_charge(spec, before, before + delta, allowance) >= 0


def test_volume_can_cost_less_for_more_and_the_increment_goes_negative() -> None:
    spec = parse_spec(
        {
            "model": "volume",
            "unit": "USD",
            "tiers": [{"up_to": "100", "unit_amount": "1.00"}, {"up_to": None, "unit_amount": "0.50"}],
        }
    )
    assert price(spec, D(100)).amount == D(100)
    assert price(spec, D(101)).amount == D("50.5")  # one more unit, 49.50 cheaper
    assert incremental_charge(spec, D(100), D(101)) == -49_500_000_000
    # the whole sequence still telescopes: 60 + 40 + 1 units
    increments = [
        incremental_charge(spec, D(0), D(60)),
        incremental_charge(spec, D(60), D(100)),
        incremental_charge(spec, D(100), D(101)),
    ]
    assert increments == [60_000_000_000, 40_000_000_000, -49_500_000_000]
    assert sum(increments) == period_charge(spec, D(101))


@settings(max_examples=200)
@given(spec=spec_of("volume"), a=quantities, b=quantities)
def test_volume_is_monotone_within_a_band(spec: Any, a: Decimal, b: Decimal) -> None:
    low, high = min(a, b), max(a, b)

    def band(q: Decimal) -> int:
        return next(i for i, t in enumerate(spec.bands) if t.upper is None or q <= t.upper)

    if low > 0 and band(low) == band(high):
        assert price(spec, low).amount <= price(spec, high).amount


@settings(max_examples=500)
@given(
    spec=any_specs,
    events=st.lists(st.one_of(small_quantities, quantities), max_size=25),
    allowance=st.one_of(st.just(D(0)), small_quantities, quantities),
)
@example(
    spec=parse_spec(
        {
            "model": "volume",
            "unit": "USD",
            "tiers": [{"up_to": "10", "unit_amount": "0.0000000015"}, {"up_to": None, "unit_amount": "0.1"}],
        }
    ),
    events=[D(1), D(1), D(1), D("7.5"), D("0.5")],
    allowance=D("0.5"),
)
def test_real_time_increments_sum_to_the_period_charge(
    spec: PriceSpec, events: list[Decimal], allowance: Decimal
) -> None:
    cumulative = D(0)
    total_increments = 0
    for q in events:
        total_increments += incremental_charge(spec, cumulative, cumulative + q, allowance)
        cumulative += q
    assert total_increments == period_charge_of_events(spec, events, allowance)
    if not is_per_event(spec):
        assert total_increments == period_charge(spec, cumulative, allowance)


@settings(max_examples=200)
@given(
    spec=any_specs.filter(lambda s: not is_per_event(s)),
    readings=st.lists(quantities, min_size=1, max_size=15),
    allowance=small_quantities,
)
def test_increments_telescope_even_when_the_aggregate_goes_down(
    spec: PriceSpec, readings: list[Decimal], allowance: Decimal
) -> None:
    """A "last value" meter can go down; charging the difference still lands on the final period charge."""
    previous = D(0)
    charged = 0
    for reading in readings:
        charged += incremental_charge(spec, previous, reading, allowance)
        previous = reading
    assert charged == period_charge(spec, readings[-1], allowance)


@settings(max_examples=300)
@given(spec=any_specs, q=quantities)
def test_breakdown_lines_add_up(spec: PriceSpec, q: Decimal) -> None:
    result = price(spec, q)
    assert sum((line.amount for line in result.lines), D(0)) == result.amount
    assert result.amount >= 0
    assert result.unit == spec.unit
    if q == 0:
        assert result.amount == 0


@settings(max_examples=200)
@given(spec=spec_of("percentage"), q=quantities.filter(lambda d: d > 0))
def test_percentage_fee_is_clamped(spec: Any, q: Decimal) -> None:
    fee = price(spec, q).amount
    if spec.min_amount is not None:
        assert fee >= spec.min_amount
    if spec.max_amount is not None:
        assert fee <= spec.max_amount
    if spec.min_amount is None and spec.max_amount is None:
        assert fee == q * spec.rate + spec.fixed_amount


@settings(max_examples=200)
@given(
    spec=st.sampled_from(["graduated", "stairstep"]).flatmap(spec_of),
    epsilon=st.sampled_from([D("0.001"), D("0.5"), D(1)]),
)
def test_monotone_across_every_band_boundary(spec: Any, epsilon: Decimal) -> None:
    """Probe exactly on each inclusive bound and on either side of it."""
    for band in spec.bands:
        if band.upper is None:
            continue
        probes = [max(D(0), band.upper - epsilon), band.upper, band.upper + epsilon]
        charged = [price(spec, q).amount for q in probes]
        assert charged == sorted(charged)
