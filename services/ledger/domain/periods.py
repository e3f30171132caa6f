"""Billing periods and proration, pure.

The period calendar itself (calendar-correct month ends in the subscription's time zone, ``period_end``) is
``billing_events.periods``, shared with rating, which must find the same periods; so is a new period's
anchor day (``anchor_day``: the day of its start in the subscription's time zone, never the UTC day).
Proration is to the second: the unused fraction of a period is (period end - change time) / (period end -
period start), exact as a Decimal ratio of whole seconds.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from billing_events.money import RATING_CONTEXT
from billing_events.periods import MONTHS, add_days, add_months, anchor_day, period_end

__all__ = ["MONTHS", "add_days", "add_months", "anchor_day", "period_end", "prorate", "proration_fraction"]


def proration_fraction(start: datetime, end: datetime, at: datetime) -> Decimal:
    """The share of [start, end) that is still to come at ``at``, to the second (0 before/after bounds)."""
    total = int((end - start).total_seconds())
    if total <= 0:
        return Decimal(0)
    remaining = int((end - max(min(at, end), start)).total_seconds())
    return RATING_CONTEXT.divide(Decimal(remaining), Decimal(total))


def prorate(amount: Decimal, start: datetime, end: datetime, at: datetime) -> Decimal:
    """``amount`` for the rest of the period, exact (rounded once, later, on the invoice line)."""
    return RATING_CONTEXT.multiply(amount, proration_fraction(start, end, at))
