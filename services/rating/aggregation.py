"""Meter aggregation rules, pure: which events count, how they group, and a period's quantity.

``sum`` and ``count`` are priced in real time (each event's charge is the difference of the cumulative
price). ``max``, ``last`` and ``unique_count`` have no well-defined per-event increment, so they are
priced once at period close; until then the balance shows nothing for them (their usage is recorded,
their charge is not yet posted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from billing_events.catalog import MeterDef
from billing_events.money import RATING_CONTEXT

REAL_TIME = frozenset({"sum", "count"})
GROUP_SEPARATOR = "|"


def period_of(moment: datetime) -> str:
    """The billing period of a moment: the calendar month in UTC (subscriptions bring their own anchors)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return f"{moment.year}-{moment.month:02d}"  # strftime("%Y-%m"), without its cost on the hot path


def matches(meter: MeterDef, properties: Mapping[str, object]) -> bool:
    """True when the event passes the meter's property filters (each property one of its listed values)."""
    return not meter.filters or all(
        str(properties.get(name)) in allowed for name, allowed in meter.filters.items())


def group_key(meter: MeterDef, properties: Mapping[str, object]) -> str:
    """The group an event's quantity counts in ('' when the meter has no group-by)."""
    if not meter.group_by:
        return ""
    return GROUP_SEPARATOR.join(f"{name}={properties.get(name, '')}" for name in meter.group_by)


def contribution(meter: MeterDef, quantity: Decimal) -> Decimal:
    """What one event adds to a real-time meter's running total."""
    return Decimal(1) if meter.aggregation == "count" else quantity


@dataclass(frozen=True, slots=True)
class Observation:
    """One counted event, as the close needs it."""

    event_id: str
    at: datetime
    quantity: Decimal
    value: str | None  # the value_property's value, for unique_count


def aggregate(meter: MeterDef, observations: Iterable[Observation]) -> Decimal:
    """A period's quantity under the meter's rule."""
    items = list(observations)
    if not items:
        return Decimal(0)
    rule = meter.aggregation
    if rule == "sum":
        total = Decimal(0)
        for item in items:
            total = RATING_CONTEXT.add(total, item.quantity)
        return total
    if rule == "count":
        return Decimal(len(items))
    if rule == "max":
        return max(item.quantity for item in items)
    if rule == "last":
        return max(items, key=lambda item: (item.at, item.event_id)).quantity
    if rule == "unique_count":
        return Decimal(len({item.value for item in items if item.value is not None}))
    raise ValueError(f"unknown aggregation {rule!r}")
