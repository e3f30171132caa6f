"""What a subscription change costs, pure: the same function feeds the invoice preview and the change.

Base fees are ``plan.base_fee x quantity`` per period. A mid-period change credits the unused part of the
old fee and charges the rest of the period at the new fee, both prorated to the second; a cadence change
(monthly <-> annual) credits the unused old period and starts a new full period now. During a trial
nothing has been billed, so nothing is prorated. An immediate cancellation credits the unused part.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from billing_events.money import RATING_CONTEXT
from billing_ledger.domain.invoice import line
from billing_ledger.domain.periods import anchor_day, period_end, proration_fraction
from billing_ledger.domain.subscription import TRIALING


def base_fee(plan: dict[str, Any], quantity: int) -> Decimal:
    return RATING_CONTEXT.multiply(Decimal(str(plan.get("base_fee", "0"))), Decimal(quantity))


def _label(plan: dict[str, Any], quantity: int) -> str:
    return f"{plan['name']} v{plan['version']} x {quantity}"


def local_date(moment: datetime, time_zone: str) -> date:
    """The calendar date of ``moment`` in the subscription's time zone, as a fee line's description says it (the
    exact ``service_start``/``service_end`` stay UTC instants): a Berlin period from Nov 1 00:00 local reads
    "from 2026-11-01 to 2026-12-01", not the UTC dates 2026-10-31 and 2026-11-30."""
    return moment.astimezone(ZoneInfo(time_zone)).date()


def service_period(start: datetime, end: datetime) -> dict[str, str]:
    """The service period [start, end) a fee line charges for, on the line (``service_start``, ``service_end``):
    the ledger defers the fee and recognises it over that period (``BillingAccount.recognise_fee_revenue``)."""
    return {"service_start": start.isoformat(), "service_end": end.isoformat()}


def quote_change(*, status: str, plan: dict[str, Any], quantity: int, period_start: datetime,
                 period_end_at: datetime, time_zone: str, new_plan: dict[str, Any], new_quantity: int,
                 at: datetime) -> list[dict[str, Any]]:
    if status == TRIALING:
        return []
    unit = plan["currency"]
    fraction = proration_fraction(period_start, period_end_at, at)
    old_fee = base_fee(plan, quantity)
    new_fee = base_fee(new_plan, new_quantity)
    lines = []
    unused = RATING_CONTEXT.multiply(old_fee, fraction)
    if unused:
        lines.append(line("proration", f"Unused time on {_label(plan, quantity)}", -unused, unit,
                          fraction=str(fraction)))
    if new_plan["cadence"] != plan["cadence"]:
        end = period_end(at, new_plan["cadence"], anchor_day(at, time_zone), time_zone)  # as ``change``
        lines.append(line("base_fee", f"{_label(new_plan, new_quantity)} from {local_date(at, time_zone)} to {local_date(end, time_zone)}",
                          new_fee, unit, quantity=str(new_quantity), unit_amount=str(new_plan.get("base_fee", "0")),
                          **service_period(at, end)))
    else:
        remaining = RATING_CONTEXT.multiply(new_fee, fraction)
        if remaining:
            lines.append(line("proration", f"Remaining time on {_label(new_plan, new_quantity)}", remaining, unit,
                              fraction=str(fraction), **service_period(at, period_end_at)))
    return lines


def quote_cancel(*, status: str, plan: dict[str, Any], quantity: int, period_start: datetime,
                 period_end_at: datetime, at: datetime) -> list[dict[str, Any]]:
    if status == TRIALING:
        return []
    unused = RATING_CONTEXT.multiply(base_fee(plan, quantity), proration_fraction(period_start, period_end_at, at))
    if not unused:
        return []
    return [line("proration", f"Unused time on {_label(plan, quantity)} (canceled)", -unused, plan["currency"])]


def quote_unused(*, lines: list[dict[str, Any]], unit: str, billed_by: str, at: datetime,
                 canceled: bool) -> list[dict[str, Any]]:
    """The credit for the unused time at ``at`` of what a document billed for its service period (its ``lines``
    that name one, ``service_period``), at the amounts it billed: a change's or cancel's credit for the unused time
    of that document when it is not the plan and quantity the subscription holds now (the document that billed
    those was voided, so the one it corrected bills the period again). ``billed_by``: the document's number."""
    unused = Decimal(0)
    for item in lines:
        amount = Decimal(item["amount"])
        if amount > 0 and item.get("service_start") and item.get("service_end"):
            share = proration_fraction(datetime.fromisoformat(item["service_start"]),
                                       datetime.fromisoformat(item["service_end"]), at)
            unused = RATING_CONTEXT.add(unused, RATING_CONTEXT.multiply(amount, share))
    if not unused:
        return []
    return [line("proration", f"Unused time on {billed_by}{' (canceled)' if canceled else ''}", -unused, unit)]


def quote_resume(*, plan: dict[str, Any], quantity: int, period_start: datetime, period_end_at: datetime,
                 at: datetime) -> list[dict[str, Any]]:
    """Resuming in a period that began while paused (so unbilled): its rest, at the plan's fee."""
    remaining = RATING_CONTEXT.multiply(base_fee(plan, quantity), proration_fraction(period_start, period_end_at, at))
    if not remaining:
        return []
    return [line("proration", f"Remaining time on {_label(plan, quantity)} (resumed)", remaining, plan["currency"],
                 fraction=str(proration_fraction(period_start, period_end_at, at)), **service_period(at, period_end_at))]


def period_fee_line(plan: dict[str, Any], quantity: int, start: datetime, end: datetime, time_zone: str
                    ) -> dict[str, Any]:
    return line("base_fee", f"{_label(plan, quantity)} from {local_date(start, time_zone)} to {local_date(end, time_zone)}",
                base_fee(plan, quantity), plan["currency"], quantity=str(quantity),
                unit_amount=str(plan.get("base_fee", "0")), **service_period(start, end))


def paused_period_line(plan: dict[str, Any], quantity: int, start: datetime, end: datetime, time_zone: str
                       ) -> dict[str, Any]:
    """The renewal draft's line for a period that begins while paused: no fee (the draft takes usage lines)."""
    return line("base_fee", f"{_label(plan, quantity)} from {local_date(start, time_zone)} to "
                f"{local_date(end, time_zone)}: paused, no fee",
                Decimal(0), plan["currency"], quantity=str(quantity), unit_amount="0")


def localized(plan: dict[str, Any], code: str) -> dict[str, Any] | None:
    """``plan`` as billed in currency ``code``: itself in its own currency, its localized prices (``prices``)
    in another one, ``None`` when it has no price in ``code``. No exchange rate is ever applied; the plan a
    subscription records is the localized one, so fees, proration and the minimum spend all follow it."""
    if plan["currency"] == code:
        return plan
    local = (plan.get("prices") or {}).get(code)
    if local is None:
        return None
    return {**plan, "currency": code, "base_fee": local["base_fee"], "minimum_spend": local.get("minimum_spend"),
            "list_currency": plan["currency"]}
