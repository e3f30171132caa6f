"""Evaluations per second of each charge model on one core (a plain script; pytest does not collect it).

    .venv/bin/python tests/bench/bench_pricing.py [--seconds 1.0]

Each model prices a cycle of 1,000 pre-built Decimal quantities spread over its bands (so tiered models
hit every band), through the public ``price(spec, quantity)``; ``incremental_charge`` (two prices and two
sub-unit conversions) is measured too, as that is what real-time drawdown calls per event, and ``amount``
(the price without its breakdown, what rating's ``period_charge`` uses where a model has it). Target:
>= 100,000 evaluations/s for per_unit and for graduated with 4 tiers.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from decimal import Decimal

from billing_rating.charge_models import amount, parse_spec, price
from billing_rating.pricing import ai_token_price, incremental_charge, parse_ai_price_table

TIERS = [
    {"up_to": "1000", "unit_amount": "0.010", "flat_amount": "1"},
    {"up_to": "10000", "unit_amount": "0.008"},
    {"up_to": "100000", "unit_amount": "0.005"},
    {"up_to": None, "unit_amount": "0.002"},
]
SPECS = {
    "flat": {"model": "flat", "unit": "USD", "amount": "10"},
    "per_unit": {"model": "per_unit", "unit": "USD", "unit_amount": "0.000002"},
    "graduated (4 tiers)": {"model": "graduated", "unit": "USD", "tiers": TIERS},
    "volume (4 tiers)": {"model": "volume", "unit": "USD", "tiers": TIERS},
    "stairstep (4 steps)": {
        "model": "stairstep",
        "unit": "USD",
        "steps": [{"up_to": t["up_to"], "amount": "5"} for t in TIERS],
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


def quantities(n: int = 1000) -> list[Decimal]:
    rng = random.Random(42)
    # log-uniform over 0.001 .. 1,000,000 with 3 decimals, so every band gets traffic
    return [Decimal(int(10 ** rng.uniform(0, 9))).scaleb(-3) for _ in range(n)]


def rate(fn: Callable[[Decimal], object], qs: list[Decimal], seconds: float) -> float:
    """Evaluations per second of ``fn`` over ``qs``, repeated for at least ``seconds``."""
    for q in qs[:100]:  # warm-up
        fn(q)
    done = 0
    start = time.perf_counter()
    while True:
        for q in qs:
            fn(q)
        done += len(qs)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    qs = quantities()
    rows: list[tuple[str, float]] = []
    for name, data in SPECS.items():
        spec = parse_spec(data)
        rows.append((f"price: {name}", rate(lambda q, s=spec: price(s, q), qs, args.seconds)))
    for name in ("per_unit", "graduated (4 tiers)"):  # the amount-only path rating's period_charge takes
        spec = parse_spec(SPECS[name])
        rows.append((f"amount: {name}", rate(lambda q, s=spec: amount(s, q), qs, args.seconds)))
    for name in ("per_unit", "graduated (4 tiers)", "volume (4 tiers)"):
        spec = parse_spec(SPECS[name])
        step = Decimal("12.5")
        rows.append(
            (
                f"incremental_charge: {name}",
                rate(
                    lambda q, s=spec, d=step: incremental_charge(s, q, q + d, Decimal(100)), qs, args.seconds
                ),
            )
        )
    table = parse_ai_price_table(
        {"unit": "USD", "models": {"gpt-4o": {"input": "2.50", "output": "10.00", "cached_input": "1.25"}}}
    )
    counts = {"input": 1200, "output": 350, "cached_input": 800}
    rows.append(
        (
            "ai_token_price (3 classes)",
            rate(lambda _q: ai_token_price(table, "gpt-4o", counts), qs, args.seconds),
        )
    )
    spec_data = SPECS["graduated (4 tiers)"]
    rows.append(
        ("parse_spec: graduated (4 tiers)", rate(lambda _q: parse_spec(spec_data), qs[:200], args.seconds))
    )

    width = max(len(name) for name, _ in rows)
    print(f"{'operation':<{width}}  {'evals/s':>12}  {'us/eval':>8}")
    print("-" * (width + 24))
    for name, per_second in rows:
        print(f"{name:<{width}}  {per_second:>12,.0f}  {1e6 / per_second:>8.2f}")


if __name__ == "__main__":
    main()
