"""The bench's catalogue, its accounts and a realistic usage stream, with the charges it must produce.

Everything is deterministic for a seed. The expected charge of each tenant is computed here from the
catalogue's prices with plain ``Decimal`` arithmetic, independently of the rating service's charge models,
so reconciliation checks the whole pipeline's money, not the pipeline against itself.

The stream mixes, per event (weights in ``METER_MIX``):

* ``api_calls``        per-unit price, integer quantities;
* ``compute_seconds``  graduated price (three bands, a flat fee on entering the second), 0.1 s quantities;
* ``ai_tokens``        per model (two models) and token class (input, output, cached input), with the
                       operation and user attribution properties;

over several tenants with a skewed (Zipf-like) share of the traffic, plus a few exact duplicates (some in
the same batch, some far apart) and a few bad events of every rejection kind ingest and rating know.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

SUBUNITS_PER_UNIT = Decimal(10) ** 9  # the ledger's sub-unit (docs/money.md): 1 USD = 10^9 sub-units

API_CALL_PRICE = Decimal("0.0020")
COMPUTE_TIERS: list[tuple[Decimal | None, Decimal, Decimal]] = [  # (inclusive upper bound, per unit, flat)
    (Decimal(100_000), Decimal("0.000012"), Decimal(0)),
    (Decimal(1_000_000), Decimal("0.000010"), Decimal("1.00")),
    (None, Decimal("0.000008"), Decimal(0)),
]
AI_PRICES: dict[str, dict[str, Decimal]] = {  # USD per million tokens
    "gpt-4o": {"input": Decimal("2.50"), "output": Decimal("10.00"), "cached_input": Decimal("1.25")},
    "gpt-4o-mini": {"input": Decimal("0.15"), "output": Decimal("0.60"), "cached_input": Decimal("0.075")},
}
METER_MIX = (("api_calls", 0.4), ("compute_seconds", 0.3), ("ai_tokens", 0.3))
GRANT_USD = "1000000.00"  # per tenant: never runs out, so every charge is drawn from credit
MARKER_PRICE = API_CALL_PRICE  # a marker is one api call
OPERATIONS = ("chat", "embed", "summarise", "classify")

# Bad events, each with the (stage, reason) its dead letter must carry.
BAD_KINDS: tuple[tuple[str, str, str], ...] = (
    ("invalid_json", "ingest", "invalid_json"),
    ("schema_invalid", "ingest", "schema_invalid"),
    ("invalid_quantity", "ingest", "invalid_quantity"),
    ("naive_timestamp", "ingest", "naive_timestamp"),
    ("future_timestamp", "ingest", "future_timestamp"),
    ("too_old", "ingest", "too_old"),
    ("unknown_tenant", "ingest", "unknown_tenant"),
    ("unknown_meter", "ingest", "unknown_meter"),
    ("missing_property", "ingest", "missing_property"),
    ("unknown_ai_model", "rating", "no_price"),
)


def catalog_document(tenants: list[str], now: datetime | None = None) -> dict[str, Any]:
    """The catalogue and accounts file given to ``billing catalog apply``.

    The grants are effective from a day back: usage is drawn from a grant only from its effective time on
    (earlier usage is posted as overage, a receivable), and the stream's timestamps precede the apply.
    """
    effective = ((now or datetime.now(UTC)) - timedelta(days=1)).isoformat()
    return {
        "catalog": {
            "meters": [
                {"code": "api_calls", "name": "API calls", "unit_of_measure": "call", "usage_type": "api",
                 "aggregation": "sum",
                 "price": {"model": "per_unit", "unit": "USD", "unit_amount": str(API_CALL_PRICE)}},
                {"code": "compute_seconds", "name": "Compute", "unit_of_measure": "vCPU-second",
                 "usage_type": "compute", "aggregation": "sum",
                 "price": {"model": "graduated", "unit": "USD", "tiers": [
                     {"up_to": None if up is None else str(up), "unit_amount": str(rate),
                      **({"flat_amount": str(flat)} if flat else {})}
                     for up, rate, flat in COMPUTE_TIERS]}},
                {"code": "ai_tokens", "name": "AI processing", "unit_of_measure": "token", "usage_type": "ai",
                 "aggregation": "sum", "required_properties": ["model", "operation"],
                 "ai_prices": {"unit": "USD", "models": {
                     model: {k: str(v) for k, v in prices.items()} for model, prices in AI_PRICES.items()}}},
            ],
        },
        "accounts": [
            {"tenant": t, "currency": "USD",
             "grants": [{"key": "bench-credit", "unit": "USD", "amount": GRANT_USD, "source": "promotion",
                         "effective_at": effective}]}
            for t in tenants
        ],
    }


def period_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def graduated_price(quantity: Decimal) -> Decimal:
    total, lower = Decimal(0), Decimal(0)
    for upper, rate, flat in COMPUTE_TIERS:
        if quantity <= lower:
            break
        top = quantity if upper is None or quantity < upper else upper
        total += (top - lower) * rate + flat
        if upper is None:
            break
        lower = upper
    return total


def subunits(amount: Decimal) -> int:
    scaled = amount * SUBUNITS_PER_UNIT
    assert scaled == scaled.to_integral_value(), f"bench prices must be exact in sub-units: {amount}"
    return int(scaled)


@dataclass
class Expected:
    """What the stream must do to the books, built as the stream is generated."""

    good_ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # tenant -> event ids
    # (tenant, period, meter) -> cumulative quantity; AI: (tenant, period, "ai|model|class") -> tokens
    totals: dict[tuple[str, str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    bad: Counter[tuple[str, str]] = field(default_factory=Counter)  # (stage, reason) -> count
    bad_ids: dict[str, tuple[str, str]] = field(default_factory=dict)  # event id -> (stage, reason)
    duplicates: int = 0
    by_meter: Counter[str] = field(default_factory=Counter)

    def add_good(self, event: dict[str, Any]) -> None:
        tenant, meter = event["tenant"], event["meter"]
        period = period_of(datetime.fromisoformat(event["timestamp"]))
        self.good_ids[tenant].add(event["id"])
        self.by_meter[meter] += 1
        if meter == "ai_tokens":
            model = event["properties"]["model"]
            for cls in ("input", "output", "cached_input"):
                count = event["properties"].get(f"{cls}_tokens")
                if count:
                    self.totals[(tenant, period, f"ai|{model}|{cls}")] += Decimal(count)
        else:
            self.totals[(tenant, period, meter)] += Decimal(event["quantity"])

    def charge_subunits(self) -> dict[str, int]:
        """Each tenant's expected total charge in ledger sub-units (prices of the period totals)."""
        charges: dict[str, int] = defaultdict(int)
        for (tenant, _period, key), quantity in self.totals.items():
            if key == "api_calls":
                amount = quantity * API_CALL_PRICE
            elif key == "compute_seconds":
                amount = graduated_price(quantity)
            else:
                _, model, cls = key.split("|")
                amount = quantity * AI_PRICES[model][cls] / Decimal(1_000_000)
            charges[tenant] += subunits(amount)
        return dict(charges)

    @property
    def good_count(self) -> int:
        return sum(len(v) for v in self.good_ids.values())

    @property
    def bad_count(self) -> int:
        return sum(self.bad.values())


@dataclass
class Stream:
    records: list[tuple[bytes, bytes]]  # (key, value) in send order
    expected: Expected
    tenants: list[str]

    @property
    def size(self) -> int:
        return len(self.records)


def _dumps(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def good_event(rng: random.Random, run: str, index: int, tenant: str, now: datetime) -> dict[str, Any]:
    meter = rng.choices([m for m, _ in METER_MIX], [w for _, w in METER_MIX])[0]
    at = (now - timedelta(milliseconds=rng.randint(0, 5_000))).isoformat()
    event: dict[str, Any] = {"id": f"{run}-{index:09d}", "tenant": tenant, "meter": meter, "timestamp": at}
    if meter == "api_calls":
        event["quantity"] = str(rng.randint(1, 20))
        event["properties"] = {"endpoint": rng.choice(("/v1/search", "/v1/export", "/v1/report"))}
    elif meter == "compute_seconds":
        event["quantity"] = str(Decimal(rng.randint(1, 6000)).scaleb(-1))  # 0.1 .. 600.0 s
        event["properties"] = {"region": rng.choice(("eu-west", "us-east"))}
    else:
        model = rng.choices(list(AI_PRICES), [0.3, 0.7])[0]
        inputs, outputs = rng.randint(50, 4000), rng.randint(10, 1500)
        cached = rng.choice((0, 0, rng.randint(100, 2000)))
        props: dict[str, Any] = {"model": model, "operation": rng.choice(OPERATIONS),
                                 "user": f"user-{rng.randint(1, 50)}", "input_tokens": inputs,
                                 "output_tokens": outputs}
        if cached:
            props["cached_input_tokens"] = cached
        event["quantity"] = str(inputs + outputs + cached)
        event["properties"] = props
    return event


def bad_event(kind: str, run: str, index: int, tenant: str, now: datetime) -> tuple[str | None, bytes]:
    """(event id or None, raw bytes) of one bad event of ``kind``."""
    event_id = f"{run}-bad-{index:09d}"
    base: dict[str, Any] = {"id": event_id, "tenant": tenant, "meter": "api_calls", "quantity": "1",
                            "timestamp": now.isoformat()}
    if kind == "invalid_json":
        return None, b'{"id": "' + event_id.encode() + b'", "tenant": '
    if kind == "schema_invalid":
        base.pop("meter")
    elif kind == "invalid_quantity":
        base["quantity"] = "-3"
    elif kind == "naive_timestamp":
        base["timestamp"] = now.replace(tzinfo=None).isoformat()
    elif kind == "future_timestamp":
        base["timestamp"] = (now + timedelta(days=1)).isoformat()
    elif kind == "too_old":
        base["timestamp"] = (now - timedelta(days=60)).isoformat()
    elif kind == "unknown_tenant":
        base["tenant"] = f"ghost-{run}"
    elif kind == "unknown_meter":
        base["meter"] = "teleportation"
    elif kind == "missing_property":
        base.update(meter="ai_tokens", properties={"operation": "chat", "input_tokens": 10})
    elif kind == "unknown_ai_model":
        base.update(meter="ai_tokens", properties={"model": "gpt-unknown", "operation": "chat", "input_tokens": 10})
    else:
        raise ValueError(kind)
    return event_id, _dumps(base)


def generate(run: str, tenants: list[str], events: int, *, seed: int = 7, duplicate_ratio: float = 0.005,
             bad_ratio: float = 0.002, now: datetime | None = None) -> Stream:
    """``events`` records in all: good ones, plus duplicates and bad ones in the given ratios (at least one
    of each bad kind once the stream has room for them)."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    weights = [1 / (i + 1) ** 0.8 for i in range(len(tenants))]  # a few heavy tenants, a long tail
    bad_total = max(len(BAD_KINDS), round(events * bad_ratio)) if events >= 10 * len(BAD_KINDS) else 0
    duplicate_total = max(2, round(events * duplicate_ratio)) if events >= 100 else 0
    good_total = events - bad_total - duplicate_total
    assert good_total > 0, "stream too small"
    expected = Expected()
    cumulative = list(itertools.accumulate(weights))
    # Every record gets a position; good events at 0, 1, 2, ... and the others in between, then one sort.
    placed: list[tuple[float, tuple[bytes, bytes]]] = []
    for i in range(good_total):
        tenant = rng.choices(tenants, cum_weights=cumulative)[0]
        event = good_event(rng, run, i, tenant, now)
        expected.add_good(event)
        placed.append((float(i), (tenant.encode(), _dumps(event))))
    # Duplicates: half right after their original (same consumer batch), half anywhere later.
    for d in range(duplicate_total):
        original = rng.randrange(good_total)
        position = original + 0.5 if d % 2 == 0 else rng.uniform(original + 0.5, good_total)
        placed.append((position, placed[original][1]))
        expected.duplicates += 1
    for b in range(bad_total):
        kind, stage, reason = BAD_KINDS[b % len(BAD_KINDS)]
        tenant = rng.choice(tenants)
        event_id, raw = bad_event(kind, run, b, tenant, now)
        placed.append((rng.uniform(0, good_total), (tenant.encode(), raw)))
        expected.bad[(stage, reason)] += 1
        if event_id is not None:
            expected.bad_ids[event_id] = (stage, reason)
    placed.sort(key=lambda item: item[0])
    records = [record for _, record in placed]
    return Stream(records, expected, tenants)


def marker_event(run: str, index: int, tenant: str, now: datetime) -> bytes:
    return _dumps({"id": f"{run}-marker-{index:06d}", "tenant": tenant, "meter": "api_calls", "quantity": "1",
                   "timestamp": now.isoformat()})


def merged(first: Expected, second: Expected) -> Expected:
    """What two streams sent one after the other must do together (period totals add up before pricing)."""
    result = Expected()
    for part in (first, second):
        for tenant, event_ids in part.good_ids.items():
            result.good_ids[tenant] |= event_ids
        for key, quantity in part.totals.items():
            result.totals[key] += quantity
        result.bad.update(part.bad)
        result.bad_ids.update(part.bad_ids)
        result.duplicates += part.duplicates
        result.by_meter.update(part.by_meter)
    return result
