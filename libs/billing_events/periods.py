"""Subscription billing periods: the calendar the ledger and rating must agree on, pure.

Periods are computed in the subscription's time zone with calendar-correct month ends: a subscription
anchored on the 31st renews on Feb 28 (29 in leap years), Mar 31, Apr 30 ... always returning to its anchor
day when the month has it. The ledger ends and renews periods with it; rating uses it to know the period of
usage that arrives before the ledger's ``PeriodEnded`` (the next period starts where the current one ends).

A period's anchor day is the day of the month of its start *in the subscription's time zone* (``anchor_day``):
Nov 1 00:00 in Europe/Berlin is Oct 31 23:00 UTC, and anchoring on the UTC day (31) gave a first period of two
months; Nov 30 20:00 in America/New_York (Dec 1 01:00 UTC) got periods ending on the 1st, its first one day
long. Every new anchor (a start, a trial's conversion, an activation, a cadence change) is computed here, by the
ledger and by rating alike; anchors already recorded on events are used as recorded. A trial of N days ends N
local calendar days later at the same local time (``add_days``), across a daylight saving change too.

Every period ends at the local time of its chain's anchor (``anchor``: the start the anchor day was taken from).
On a day whose clocks are put forward over that time (a subscription anchored at 02:30 in Europe/Berlin or
America/New_York, on the spring-forward day) that local time does not exist: that one period ends at the first
instant after the gap (03:00 local), and the periods after it end at the anchor's local time again. Each end is
computed from the one before it, so without the anchor the adjusted end (a later local time) was carried on to
every later period.
"""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

MONTHS = {"month": 1, "quarter": 3, "year": 12}


def add_months(moment: datetime, months: int, anchor_day: int, tz: str, anchor: datetime | None = None) -> datetime:
    """``moment`` plus ``months`` calendar months in ``tz``, on ``anchor_day`` clamped to the month's end, at the
    local time of ``anchor`` (None: of ``moment``); a local time the clocks skip that day is the first instant
    after the skip (module docstring)."""
    zone = ZoneInfo(tz)
    local = moment.astimezone(zone)
    index = local.month - 1 + months
    year, month = local.year + index // 12, index % 12 + 1
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    clock = (local if anchor is None else anchor.astimezone(zone)).time()
    return _existing(datetime.combine(local.date().replace(year=year, month=month, day=day), clock), zone)


def _existing(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant (UTC) of the local time ``wall`` (naive) in ``zone``: the first occurrence of a repeated one; for
    one the clocks skip (put forward), the first instant after the skip, when the clocks jump."""
    early = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if early.astimezone(zone).replace(tzinfo=None) == wall:
        return early
    # Skipped: fold 1 reads ``wall`` with the offset after the jump, an instant before it; fold 0 with the offset
    # before it, an instant after it. The jump is the first whole second between them with the later offset.
    low, high = wall.replace(tzinfo=zone, fold=1).astimezone(UTC), early
    after = high.astimezone(zone).utcoffset()
    while (high - low).total_seconds() > 1:
        middle = low + (high - low) / 2
        middle = middle.replace(microsecond=0)
        if middle.astimezone(zone).utcoffset() == after:
            high = middle
        else:
            low = middle
    return high


def anchor_day(moment: datetime, tz: str) -> int:
    """The anchor day of periods starting at ``moment``: its day of the month in ``tz``, not in UTC."""
    return moment.astimezone(ZoneInfo(tz)).day


def add_days(moment: datetime, days: int, tz: str) -> datetime:
    """``moment`` plus ``days`` calendar days in ``tz``, at the same local time (23 or 25 hours for a day that
    changes the clocks)."""
    local = moment.astimezone(ZoneInfo(tz))
    shifted = (local.replace(tzinfo=None) + timedelta(days=days)).replace(tzinfo=ZoneInfo(tz))
    return shifted.astimezone(UTC)


def period_end(start: datetime, cadence: str, anchor_day: int, tz: str, anchor: datetime | None = None) -> datetime:
    """The end of the period from ``start``: one cadence later on ``anchor_day``, at the local time of ``anchor``
    (the start its anchor day was taken from; None: of ``start``, right when ``start`` is that anchor)."""
    return add_months(start, MONTHS[cadence], anchor_day, tz, anchor)
