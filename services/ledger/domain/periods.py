"""Billing periods and proration, pure.

Periods are computed in the account's time zone with calendar-correct month ends: a subscription anchored
on the 31st renews on Feb 28 (29 in leap years), Mar 31, Apr 30 ... always returning to its anchor day
when the month has it. Proration is to the second: the unused fraction of a period is
(period end - change time) / (period end - period start), exact as a Decimal ratio of whole seconds.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

from billing_events.money import RATING_CONTEXT

MONTHS = {"month": 1, "quarter": 3, "year": 12}


def add_months(moment: datetime, months: int, anchor_day: int, tz: str) -> datetime:
    """``moment`` plus ``months`` calendar months in ``tz``, on ``anchor_day`` clamped to the month's end."""
    local = moment.astimezone(ZoneInfo(tz))
    index = local.month - 1 + months
    year, month = local.year + index // 12, index % 12 + 1
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    shifted = local.replace(year=year, month=month, day=day, tzinfo=None)
    return shifted.replace(tzinfo=ZoneInfo(tz)).astimezone(UTC)


def period_end(start: datetime, cadence: str, anchor_day: int, tz: str) -> datetime:
    return add_months(start, MONTHS[cadence], anchor_day, tz)


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
