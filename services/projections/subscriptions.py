"""Read model: subscriptions (status, plan and version, quantity, periods, trial end, cancellation) and MRR.

One row per ``Subscription`` aggregate. ``Started`` names the tenant and the plan (a snapshot of the published
plan version: code, name, cadence, currency, base fee); later events carry the subscription's id alone and
update the row by id: ``Changed`` (plan and/or quantity, maybe a new period), ``TrialConverted``, ``Activated``
(an ``incomplete`` subscription's first invoice paid) and ``PeriodEnded`` (the current period),
``Paused``/``Resumed``/``PastDue``/``Recovered``/``Canceled`` (status; an incomplete one never paid is canceled
with reason ``incomplete_expired``), ``CancelScheduled`` (cancel at period end).

MRR (monthly recurring revenue) is computed when asked, from the live rows: every ``active`` or ``past_due``
subscription's base fee x quantity, per currency, a quarter's fee counted as a third per month and a year's
as a twelfth. Sums are exact ``Decimal``: the annual run rate (ARR = monthly x 12 + quarterly x 4 + yearly)
needs no division at all, and MRR is ARR / 12 rounded once, half-up, to the currency's minor unit.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from billing_events.money import (
    RATING_CONTEXT,
    RATING_ROUNDING,
    MoneyError,
    currency,
    format_subunits,
    to_subunits,
)
from billing_projections.facts import Fact, json_text, utc_text
from billing_projections.writer import BatchWriter, Handler, Table, value
from billing_runtime.db import Database

SUBSCRIPTIONS = Table("subscriptions", {"subscription_id": "TEXT"}, {
    "tenant": value("TEXT NOT NULL"), "subscription_key": value("TEXT NOT NULL"), "status": value("TEXT NOT NULL"),
    "plan_code": value("TEXT NOT NULL"), "plan_name": value("TEXT"), "plan_version": value("BIGINT"),
    "cadence": value("TEXT NOT NULL"), "currency": value("TEXT NOT NULL"), "base_fee": value("TEXT NOT NULL"),
    "quantity": value("BIGINT NOT NULL"), "time_zone": value("TEXT"), "started_at": value("TEXT NOT NULL"),
    "period_start": value("TEXT"), "period_end": value("TEXT"), "trial_end": value("TEXT"),
    "cancel_at_period_end": value("INTEGER NOT NULL"), "cancel_at": value("TEXT"), "canceled_at": value("TEXT"),
    "cancel_reason": value("TEXT"), "paused_at": value("TEXT"), "recurring_grants": value("TEXT"),
    "started_by": value("TEXT"), "changed_by": value("TEXT"), "updated_at": value("TEXT"),
    "last_position": value("BIGINT"),
}, indexes=("tenant, subscription_key", "status, tenant"))
TABLES = (SUBSCRIPTIONS,)

STATUSES = ("incomplete", "trialing", "active", "past_due", "paused", "canceled")
BILLABLE = ("active", "past_due")  # what MRR counts (a trial, a paused or an unpaid incomplete one pays nothing)
MONTHS_PER_PERIOD = {"month": 1, "quarter": 3, "year": 12}
PERIODS_PER_YEAR = {cadence: 12 // months for cadence, months in MONTHS_PER_PERIOD.items()}


def handler_for(event_type: str) -> Handler | None:
    aggregate, _, name = event_type.partition(".")
    if aggregate != "Subscription":
        return None
    return _HANDLERS.get(name)


def _time(value: Any) -> str | None:
    return utc_text(value) if isinstance(value, str) and value else None


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _fee(plan: dict[str, Any]) -> str:
    """The plan's base fee shown like every amount of its currency (``92`` -> ``92.00``; more digits kept)."""
    try:
        fee = Decimal(str(plan.get("base_fee") or "0"))
    except InvalidOperation:
        return "0"
    try:
        return format_subunits(to_subunits(fee), currency(str(plan.get("currency") or "")))
    except MoneyError:
        return str(fee)


def plan_columns(plan: Any) -> dict[str, Any]:
    """The ``subscriptions`` columns of a plan snapshot (``Started``, ``Changed``); ``subscription_changes`` prices
    its rows with the same ``base_fee`` and ``cadence``, so its ARR is MRR's."""
    plan = plan if isinstance(plan, dict) else {}
    version = plan.get("version")
    return {"plan_code": str(plan.get("code") or ""), "plan_name": _text(plan.get("name")),
            "plan_version": int(version) if isinstance(version, int) else None,
            "cadence": str(plan.get("cadence") or "month"), "currency": str(plan.get("currency") or ""),
            "base_fee": _fee(plan)}


def _fresh(fact: Fact) -> dict[str, Any]:
    return {"updated_at": fact.recorded_at, "last_position": fact.position}


def _started(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    tenant = data.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        return
    w.insert(SUBSCRIPTIONS, (fact.aggregate_id,), {
        "tenant": tenant, "subscription_key": str(data.get("key") or ""), "status": str(data.get("status") or ""),
        **plan_columns(data.get("plan")), "quantity": int(data.get("quantity") or 0), "time_zone": _text(data.get("time_zone")),
        "started_at": _time(data.get("started_at")) or fact.recorded_at,
        "period_start": _time(data.get("period_start")), "period_end": _time(data.get("period_end")),
        "trial_end": _time(data.get("trial_end")), "cancel_at_period_end": 0, "started_by": _text(data.get("by")),
        **_fresh(fact)})


def _changed(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set={
        **plan_columns(data.get("plan")), "quantity": int(data.get("quantity") or 0),
        "period_start": _time(data.get("period_start")), "period_end": _time(data.get("period_end")),
        "changed_by": _text(data.get("by")), **_fresh(fact)})


def _status(status: str, **extra: Any) -> Handler:
    def handle(fact: Fact, w: BatchWriter) -> None:
        changes: dict[str, Any] = {"status": status, **_fresh(fact)}
        for column, field in extra.items():
            changes[column] = None if field is None else (_time(fact.data.get(field)) or fact.recorded_at)
        w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set=changes)

    return handle


def _converted(fact: Fact, w: BatchWriter) -> None:
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set={
        "status": "active", "period_start": _time(fact.data.get("period_start")),
        "period_end": _time(fact.data.get("period_end")), **_fresh(fact)})


def _period_ended(fact: Fact, w: BatchWriter) -> None:
    data = fact.data
    changes = _fresh(fact)
    if data.get("next_start") and data.get("next_end"):
        changes.update(period_start=_time(data["next_start"]), period_end=_time(data["next_end"]))
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set=changes)


def _cancel_scheduled(fact: Fact, w: BatchWriter) -> None:
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set={
        "cancel_at_period_end": 1, "cancel_at": _time(fact.data.get("cancel_at")), **_fresh(fact)})


def _canceled(fact: Fact, w: BatchWriter) -> None:
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set={
        "status": "canceled", "canceled_at": _time(fact.data.get("at")) or fact.recorded_at,
        "cancel_reason": _text(fact.data.get("reason")), **_fresh(fact)})


def _grants(fact: Fact, w: BatchWriter) -> None:
    grants = fact.data.get("grant_ids")
    w.upsert(SUBSCRIPTIONS, (fact.aggregate_id,), set={
        "recurring_grants": json_text(grants) if isinstance(grants, list) else None, **_fresh(fact)})


_HANDLERS: dict[str, Handler] = {
    "Started": _started, "Changed": _changed, "TrialConverted": _converted, "Activated": _converted,
    "PeriodEnded": _period_ended,
    "Paused": _status("paused", paused_at="at"), "Resumed": _status("active", paused_at=None),
    "PastDue": _status("past_due"), "Recovered": _status("active"), "CancelScheduled": _cancel_scheduled,
    "Canceled": _canceled, "RecurringGrantsIssued": _grants,
}


def project(fact: Fact, w: BatchWriter) -> None:
    handler = handler_for(fact.type)
    if handler is not None:
        handler(fact, w)


# -- queries ---------------------------------------------------------------------------------------------

COLUMNS = ("subscription_id", "tenant", "subscription_key", "status", "plan_code", "plan_name", "plan_version",
           "cadence", "currency", "base_fee", "quantity", "time_zone", "started_at", "period_start", "period_end",
           "trial_end", "cancel_at_period_end", "cancel_at", "canceled_at", "cancel_reason", "paused_at",
           "updated_at", "last_position")


SORT_KEY = ("tenant", "subscription_key", "subscription_id")  # unique: the id ends every tie


async def page(db: Database, *, tenant: str | None, statuses: tuple[str, ...] = (), plan: str | None = None,
               after: tuple[str, ...] | None = None, limit: int) -> list[dict[str, Any]]:
    """In ``SORT_KEY`` order; keyset: the rows after ``after`` (the previous page's last row's ``SORT_KEY``), so a
    subscription started between two pages moves no other row from one page to another."""
    where: list[str] = []
    args: list[Any] = []
    if tenant is not None:
        args.append(tenant)
        where.append(f"tenant = ${len(args)}")
    if statuses:
        placeholders = []
        for status in statuses:
            args.append(status)
            placeholders.append(f"${len(args)}")
        where.append(f"status IN ({', '.join(placeholders)})")
    if plan:
        args.append(plan)
        where.append(f"plan_code = ${len(args)}")
    if after is not None:
        args += list(after)
        where.append(f"(tenant, subscription_key, subscription_id) > (${len(args) - 2}, ${len(args) - 1}, ${len(args)})")
    args.append(limit)
    return await db.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM subscriptions {'WHERE ' + ' AND '.join(where) if where else ''} "
        f"ORDER BY tenant, subscription_key, subscription_id LIMIT ${len(args)}", *args)


async def mrr(db: Database, *, tenant: str | None, by_tenant: bool = False) -> list[dict[str, Any]]:
    """Recurring revenue per currency (and tenant when ``by_tenant``) of the billable subscriptions."""
    args: list[Any] = list(BILLABLE)
    where = "status IN ($1, $2)"
    if tenant is not None:
        args.append(tenant)
        where += f" AND tenant = ${len(args)}"
    rows = await db.fetch(f"SELECT tenant, currency, cadence, base_fee, quantity FROM subscriptions WHERE {where}",
                          *args)
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["tenant"] if by_tenant else "", r["currency"])
        acc = totals.setdefault(key, {"tenant": key[0] or None, "currency": r["currency"], "subscriptions": 0,
                                      "per_cadence": {c: Decimal(0) for c in MONTHS_PER_PERIOD}})
        cadence = cadence_of(r["cadence"])
        fee = RATING_CONTEXT.multiply(Decimal(r["base_fee"]), Decimal(int(r["quantity"])))
        acc["per_cadence"][cadence] = RATING_CONTEXT.add(acc["per_cadence"][cadence], fee)
        acc["subscriptions"] += 1
    result = []
    for key in sorted(totals):
        acc = totals[key]
        arr = sum((RATING_CONTEXT.multiply(amount, Decimal(PERIODS_PER_YEAR[c]))
                   for c, amount in acc["per_cadence"].items()), Decimal(0))
        result.append({**acc, "arr": arr, "mrr": mrr_of(arr, acc["currency"])})
    return result


def cadence_of(cadence: Any) -> str:
    """The cadence MRR counts a fee by (an unknown one as monthly)."""
    return cadence if cadence in MONTHS_PER_PERIOD else "month"


def annual_fee(base_fee: str, quantity: int, cadence: Any) -> Decimal:
    """A subscription's share of ARR, exact: base fee x quantity x its periods per year (what ``mrr`` sums)."""
    fee = RATING_CONTEXT.multiply(Decimal(base_fee), Decimal(int(quantity)))
    return RATING_CONTEXT.multiply(fee, Decimal(PERIODS_PER_YEAR[cadence_of(cadence)]))


def mrr_of(arr: Decimal, code: str) -> Decimal:
    """MRR of an exact ARR: ARR / 12 rounded once, half-up, to the currency's minor unit."""
    return _minor(RATING_CONTEXT.divide(arr, Decimal(12)), code)


def _minor(amount: Decimal, code: str) -> Decimal:
    try:
        scale = currency(code).minor_scale
    except MoneyError:
        scale = 2
    return amount.quantize(Decimal(1).scaleb(-scale), rounding=RATING_ROUNDING, context=RATING_CONTEXT)
