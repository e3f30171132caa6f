"""Billing periods in a subscription's time zone are whole local months: the anchor day is the day of the start
(of a trial's end, an activation, a cadence change) in that time zone, never the UTC day. The real ledger and the
real rating service wired by hand (``test_cancel_after_period_end.Stack``), so the invoices show what a customer
is billed and that rating places usage in the periods the ledger renews."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from billing_ledger.domain.invoice import Invoice
from billing_ledger.domain.proration import quote_change
from billing_ledger.domain.subscription import CHARGE_BEFORE_ACCESS, Subscription, subscription_id

from tests.unit.subscriptions.test_cancel_after_period_end import Stack, wired_stack

BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")
PER_CALL = {"model": "per_unit", "unit": "USD", "unit_amount": "1"}
GRADUATED = {"model": "graduated", "unit": "USD", "tiers": [{"up_to": "100", "unit_amount": "0.10"},
                                                             {"up_to": None, "unit_amount": "0.01"}]}
MONTHLY: dict[str, Any] = {"code": "p", "name": "P", "version": 1, "currency": "USD", "base_fee": "10.00",
                           "cadence": "month"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "price": PER_CALL},
               {"code": "peak", "aggregation": "max", "price": PER_CALL}],  # priced when its period closes
    "plans": [{**MONTHLY, "charges": [{"meter": "api_calls", "included": "10", "price": GRADUATED},
                                      {"meter": "peak", "price": PER_CALL}]},
              {"code": "t", "name": "T", "version": 1, "currency": "USD", "base_fee": "10.00", "trial_days": 14,
               "charges": [{"meter": "api_calls", "price": PER_CALL}]}],
}


def local(tz: ZoneInfo, *args: int) -> datetime:
    return datetime(*args, tzinfo=tz).astimezone(UTC)  # type: ignore[misc]


def fee_periods(stack: Stack) -> list[tuple[datetime, datetime, Decimal]]:
    """(service start, service end, amount) of every base fee billed on a finalized invoice, in order."""
    fees = [(datetime.fromisoformat(item["service_start"]), datetime.fromisoformat(item["service_end"]),
             Decimal(item["amount"]))
            for invoice in stack.invoices().values() if invoice.status == "finalized"
            for item in invoice.lines if item["kind"] == "base_fee"]
    return sorted(fees)


def usage_lines(invoice: Invoice) -> dict[str, tuple[str, str]]:
    return {item["meter"]: (item["quantity"], item["amount"]) for item in invoice.lines if item["kind"] == "usage"}


async def settle(stack: Stack) -> None:
    for _ in range(4):
        await stack.relay()
        await stack.deliver()
    assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results


@pytest.mark.parametrize(("tz", "start", "periods"), [
    # Nov 1 00:00 in Berlin is Oct 31 23:00 UTC: anchored on the 31st, its first period ran to Dec 31 (two months
    # for one fee), then Jan 30 (a month of 30 days).
    (BERLIN, (2026, 11, 1), [((2026, 11, 1), (2026, 12, 1)), ((2026, 12, 1), (2027, 1, 1)),
                             ((2027, 1, 1), (2027, 2, 1))]),
    # Nov 30 20:00 in New York is Dec 1 01:00 UTC: anchored on the 1st, its first period was one day (Dec 1 - 2,
    # the whole fee), and 64 days billed 4 fees.
    (NEW_YORK, (2026, 11, 30, 20), [((2026, 11, 30, 20), (2026, 12, 30, 20)), ((2026, 12, 30, 20), (2027, 1, 30, 20)),
                                    ((2027, 1, 30, 20), (2027, 2, 28, 20))]),
])
async def test_periods_in_a_time_zone_are_whole_local_months_from_the_local_start(
        tmp_path: Path, tz: ZoneInfo, start: tuple[int, ...], periods: list[tuple[tuple[int, ...], ...]]) -> None:
    at = local(tz, *start)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", at, key="m", plan="p", time_zone=str(tz))
        sub = stack.ledger.repository.get(subscription_id("acme", "m"))
        assert (sub.anchor_day, sub.period_end) == (start[2], local(tz, *periods[0][1]))
        for day in range(1, 65):  # the scheduler's daily ticks for 64 days
            stack.run("subscription.tick", at + timedelta(days=day), key="m")
        await settle(stack)
        assert fee_periods(stack) == [(local(tz, *begin), local(tz, *end), Decimal("10.00")) for begin, end in periods]


async def test_fee_lines_name_the_local_dates_of_their_period(tmp_path: Path) -> None:
    # Nov 1 00:00 in Berlin is Oct 31 23:00 UTC: the lines said "from 2026-10-31 to 2026-11-30" (the UTC dates of
    # a period the customer knows as November), while their service_start/service_end were right.
    nov_1, dec_1 = local(BERLIN, 2026, 11, 1), local(BERLIN, 2026, 12, 1)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", nov_1, key="m", plan="p", time_zone="Europe/Berlin")
        stack.run("subscription.tick", dec_1, key="m")
        await settle(stack)
        fees = sorted((item["service_start"], item["description"]) for invoice in stack.invoices().values()
                      for item in invoice.lines if item["kind"] == "base_fee")
        assert [description for _, description in fees] == ["P v1 x 1 from 2026-11-01 to 2026-12-01",
                                                            "P v1 x 1 from 2026-12-01 to 2027-01-01"]


async def test_usage_around_local_month_ends_is_billed_with_the_local_month_it_was_used_in(tmp_path: Path) -> None:
    nov_1, dec_1, jan_1 = local(BERLIN, 2026, 11, 1), local(BERLIN, 2026, 12, 1), local(BERLIN, 2027, 1, 1)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", nov_1, key="m", plan="p", time_zone="Europe/Berlin")
        await settle(stack)
        minute = timedelta(minutes=1)
        await stack.use("n0", "60", nov_1 + 30 * minute)            # Nov 1 00:30 Berlin (Oct 31 UTC): November
        await stack.use("n1", "50", dec_1 - minute)                 # Nov 30 23:59 Berlin: November
        await stack.use("p1", "5", dec_1 - minute, meter="peak")
        # Dec 1 00:30 Berlin, before the ledger's tick: rating places it in the period after November, as the
        # ledger renews it (it used to be November's: the ledger's first period ran to Dec 31).
        await stack.use("d1", "200", dec_1 + 30 * minute)
        await stack.use("p2", "50", dec_1 + 30 * minute, meter="peak")
        stack.run("subscription.tick", dec_1, key="m")
        await settle(stack)
        await stack.use("d2", "5", jan_1 - minute)                   # Dec 31 23:59 Berlin: December
        stack.run("subscription.tick", jan_1, key="m")
        await settle(stack)
        november, december = stack.invoice(dec_1.isoformat()), stack.invoice(jan_1.isoformat())
        # November: 110 calls, 10 included, 100 x 0.10; peak 5. December: 205 calls, 10 included, 100 x 0.10 +
        # 95 x 0.01; peak 50.
        assert (november.status, november.total, usage_lines(november)) == (
            "finalized", Decimal("25.00"), {"api_calls": ("110", "10.00"), "peak": ("5", "5.00")})
        assert (december.status, december.total, usage_lines(december)) == (
            "finalized", Decimal("70.95"), {"api_calls": ("205", "10.95"), "peak": ("50", "50.00")})


async def test_a_trial_ends_after_whole_local_days_and_converts_into_local_months(tmp_path: Path) -> None:
    # 14 days from Oct 20 20:00 in New York, across the end of daylight saving time (Nov 1): Nov 3 20:00 EST. It
    # used to end 14 x 24 h later (Nov 3 19:00 EST, Nov 4 UTC) and convert anchored on the 4th (to Dec 4 19:00).
    start, trial_end = local(NEW_YORK, 2026, 10, 20, 20), local(NEW_YORK, 2026, 11, 3, 20)
    dec_3, jan_3 = local(NEW_YORK, 2026, 12, 3, 20), local(NEW_YORK, 2027, 1, 3, 20)
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("payment_method.add", start, method_id="pm_1", gateway="stripe", label="visa", default=True)
        stack.run("subscription.create", start, key="m", plan="t", time_zone="America/New_York")
        await settle(stack)
        assert stack.ledger.repository.get(subscription_id("acme", "m")).trial_end == trial_end
        # Before any tick: rating places usage after the trial's end in the periods the conversion will start.
        await stack.use("first", "3", dec_3 - timedelta(minutes=30))    # Dec 3 19:30 New York: first period
        await stack.use("second", "4", dec_3 + timedelta(hours=1))      # Dec 3 21:00 New York: second period
        for tick in (trial_end, dec_3, jan_3):
            stack.run("subscription.tick", tick, key="m")
            await settle(stack)
        sub = stack.ledger.repository.get(subscription_id("acme", "m"))
        assert (sub.anchor_day, sub.period_start, sub.period_end) == (3, jan_3, local(NEW_YORK, 2027, 2, 3, 20))
        assert fee_periods(stack) == [(trial_end, dec_3, Decimal("10.00")), (dec_3, jan_3, Decimal("10.00")),
                                      (jan_3, sub.period_end, Decimal("10.00"))]
        assert usage_lines(stack.invoice(dec_3.isoformat())) == {"api_calls": ("3", "3.00")}
        assert usage_lines(stack.invoice(jan_3.isoformat())) == {"api_calls": ("4", "4.00")}


def started(tz: ZoneInfo, at: datetime, **options: Any) -> Subscription:
    return Subscription.start(tenant="acme", key="m", plan=MONTHLY, quantity=1, time_zone=str(tz), at=at,
                              trial=False, by="user:test", **options)


def test_a_cadence_change_restarts_the_period_on_the_local_day_of_the_change() -> None:
    sub = started(BERLIN, local(BERLIN, 2026, 11, 1))
    at = local(BERLIN, 2026, 12, 15, 0, 30)  # Dec 14 23:30 UTC
    yearly = {**MONTHLY, "code": "y", "base_fee": "100.00", "cadence": "year"}
    lines = quote_change(status=sub.status, plan=sub.plan, quantity=1, period_start=sub.period_start,
                         period_end_at=sub.period_end, time_zone=sub.time_zone, new_plan=yearly, new_quantity=1, at=at)
    [fee] = [item for item in lines if item["kind"] == "base_fee"]
    sub.change(plan=yearly, quantity=1, at=at, by="user:test", lines=lines)
    # A whole local year billed and served: to Dec 15 2027 00:30 in Berlin, renewing on the 15th (not the 14th).
    year_end = local(BERLIN, 2027, 12, 15, 0, 30)
    assert (sub.anchor_day, sub.period_start, sub.period_end) == (15, at, year_end)
    assert (fee["amount"], fee["service_start"], fee["service_end"]) == ("100.00", at.isoformat(), year_end.isoformat())
    assert fee["description"] == "P v1 x 1 from 2026-12-15 to 2027-12-15"  # local dates (UTC: from 2026-12-14)


def test_a_charge_before_access_subscription_activates_into_a_local_month() -> None:
    sub = started(NEW_YORK, local(NEW_YORK, 2026, 11, 28, 9), collection=CHARGE_BEFORE_ACCESS)
    paid = local(NEW_YORK, 2026, 11, 30, 20)  # Dec 1 01:00 UTC
    sub.activate(at=paid, by="system:payment")
    assert (sub.anchor_day, sub.period_start, sub.period_end) == (30, paid, local(NEW_YORK, 2026, 12, 30, 20))
    assert sub.renew(at=sub.period_end)
    assert sub.period_end == local(NEW_YORK, 2027, 1, 30, 20)


def test_a_subscription_recorded_with_a_utc_day_anchor_renews_on_it_as_recorded() -> None:
    # What the ledger recorded before anchors were local days: Nov 1 00:00 in Berlin anchored on the 31st. Its
    # events keep their meaning: it renews on the anchor it recorded.
    nov_1, dec_31 = local(BERLIN, 2026, 11, 1), local(BERLIN, 2026, 12, 31)
    sub = Subscription(tenant="acme", key="m", plan=MONTHLY, quantity=1, time_zone="Europe/Berlin", anchor_day=31,
                       started_at=nov_1, period_start=nov_1, period_end=dec_31, trial_end=None, status="active",
                       by="user:test")
    assert sub.renew(at=dec_31)
    assert (sub.anchor_day, sub.period_start, sub.period_end) == (31, dec_31, local(BERLIN, 2027, 1, 31))


@pytest.mark.parametrize(("tz", "day", "gap"), [
    (BERLIN, 29, (2026, 3, 29)),    # clocks forward 02:00 -> 03:00 on Sunday Mar 29 2026
    (NEW_YORK, 8, (2026, 3, 8)),    # clocks forward 02:00 -> 03:00 on Sunday Mar 8 2026
])
async def test_only_the_period_ending_in_a_daylight_saving_gap_is_moved_and_rating_agrees(
        tmp_path: Path, tz: ZoneInfo, day: int, gap: tuple[int, int, int]) -> None:
    # Anchored at 02:30 local: the spring-forward day has no 02:30, so that period ends when the clocks jump
    # (03:00). Each end was computed from the one before, so 03:00 (03:30 before) became the local time of every
    # later period: April's fee ran to 03:00, a month and half an hour long, and so on for good.
    start = local(tz, 2026, 1, day, 2, 30)
    jump = datetime(*gap, 3, 0, tzinfo=tz).astimezone(UTC)
    ends = [local(tz, 2026, 2, min(day, 28), 2, 30), jump, local(tz, 2026, 4, day, 2, 30), local(tz, 2026, 5, day, 2, 30)]
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("subscription.create", start, key="m", plan="p", time_zone=str(tz))
        await settle(stack)
        stack.run("subscription.tick", ends[0], key="m")
        await settle(stack)
        # Before the ledger's ticks of the March and April ends: rating predicts the period after March's from the
        # anchor too, so usage at 02:45 local on the April end's day is in the period after it (at 02:15, before
        # it, in the one from the jump), as the ledger then renews.
        await stack.use("april", "3", ends[2] - timedelta(minutes=15))
        await stack.use("may", "4", ends[2] + timedelta(minutes=15))
        for end in ends[1:]:
            stack.run("subscription.tick", end, key="m")
            await settle(stack)
        sub = stack.ledger.repository.get(subscription_id("acme", "m"))
        assert (sub.period_start, sub.period_end) == (ends[3], local(tz, 2026, 6, day, 2, 30))
        assert [(s, e) for s, e, _ in fee_periods(stack)] == list(zip([start, *ends], [*ends, sub.period_end],
                                                                     strict=True))
        assert usage_lines(stack.invoice(ends[2].isoformat()))["api_calls"][0] == "3"
        assert usage_lines(stack.invoice(ends[3].isoformat()))["api_calls"][0] == "4"


def test_a_period_end_in_a_daylight_saving_gap_is_the_jump_and_the_next_ends_keep_the_anchors_local_time() -> None:
    sub = started(BERLIN, local(BERLIN, 2026, 1, 29, 2, 30))
    for _ in range(2):  # Feb 28, then Mar 29
        assert sub.renew(at=sub.period_end)
    assert sub.period_start == datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN).astimezone(UTC)  # 01:00 UTC, CEST
    assert sub.period_end == local(BERLIN, 2026, 4, 29, 2, 30)
    # The invoice preview's walk over periods due (``renewed_period``) finds the same periods.
    fresh = started(BERLIN, local(BERLIN, 2026, 1, 29, 2, 30))
    assert fresh.renewed_period(local(BERLIN, 2026, 4, 29, 2, 0), 12) == (sub.period_start, sub.period_end)
