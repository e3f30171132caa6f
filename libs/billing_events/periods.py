"""Subscription billing periods: the calendar the ledger and rating must agree on, pure.

Periods are computed in the subscription's time zone with calendar-correct month ends: a subscription
anchored on the 31st renews on Feb 28 (29 in leap years), Mar 31, Apr 30 ... always returning to its anchor
day when the month has it. The ledger ends and renews periods with it; rating uses it to know the period of
usage that arrives before the ledger's ``PeriodEnded`` (the next period starts where the current one ends).
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

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
