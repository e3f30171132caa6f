"""The lists the API, the CSV exports and the dashboard show: read-model queries rendered as views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from billing_projections import (
    ai_usage,
    balances,
    catalog,
    figures,
    history,
    invoices,
    revenue,
    subscription_analytics,
    subscriptions,
    usage_monthly,
    views,
)
from billing_projections.facts import utc_text
from billing_projections.limits import ANALYTICS_MONTHS_MAX, ANALYTICS_MONTHS_SHOWN
from billing_projections.params import (
    day_param,
    decode_cursor,
    decode_key_cursor,
    encode_cursor,
    invalid,
    month_or_year,
    month_param,
)
from billing_runtime.db import Database

Page = tuple[list[dict[str, Any]], str | None]


async def transactions(db: Database, *, tenant: str | None, types: Sequence[str] = (), since: str | None = None,
                       until: str | None = None, meter: str | None = None, user: str | None = None,
                       unit: str | None = None, cursor: str | None = None, limit: int) -> Page:
    unknown = [t for t in types if t not in history.TYPES]
    if unknown:
        raise invalid(f"unknown transaction type(s) {', '.join(unknown)}; known: {', '.join(history.TYPES)}",
                      "type")
    rows = await history.page(db, tenant=tenant, types=types, since=since, until=until, meter=meter, user=user,
                              unit=unit, before_position=decode_cursor(cursor, "before"), limit=limit + 1)
    units = await views.load_units(db)
    items = [views.transaction_view(r, units) for r in rows[:limit]]
    more = len(rows) > limit
    return items, encode_cursor({"before": items[-1]["position"]}) if more and items else None


async def monthly(db: Database, *, tenant: str | None, year: int | None, month: int | None,
                  meter: str | None, cursor: str | None = None, limit: int) -> Page:
    rows = await usage_monthly.summaries(db, tenant=tenant, year=year, month=month, meter=meter,
                                         after=decode_key_cursor(cursor, len(usage_monthly.SORT_KEY)), limit=limit + 1)
    units, meters = await views.load_units(db), await catalog.meters(db)
    items = [views.monthly_view(r, units, meters) for r in rows[:limit]]
    return items, _after(rows, limit, usage_monthly.SORT_KEY)


def _after(rows: list[dict[str, Any]], limit: int, sort_key: Sequence[str]) -> str | None:
    """A keyset cursor past the page's last row (``rows`` were read with ``limit + 1``: one more means a next page)."""
    if len(rows) <= limit:
        return None
    return encode_cursor({"after": [str(rows[limit - 1][column]) for column in sort_key]})


async def ai(db: Database, *, tenant: str | None, year: int | None, month: int | None,
             group_by: Sequence[str], model: str | None = None, user: str | None = None) -> list[dict[str, Any]]:
    columns = tuple("user_id" if g == "user" else g for g in group_by)
    bad = [g for g in columns if g not in ai_usage.GROUPINGS]
    if bad or not columns:
        raise invalid("group_by takes a comma-separated subset of model, operation, user", "group_by")
    exact, prefix = usage_monthly.period(year, month)
    rows = await ai_usage.summary(db, tenant=tenant, period=exact, year_prefix=prefix, group_by=columns,
                                  model=model, user=user)
    units = await views.load_units(db)
    return [views.ai_view(r, units) for r in rows]


async def figure_series(db: Database, *, tenant: str | None, granularity: str, since: str | None,
                        until: str | None, unit: str | None = None) -> list[dict[str, Any]]:
    if granularity not in ("day", "month"):
        raise invalid("granularity must be day or month", "granularity")
    rows = await figures.series(db, tenant=tenant, granularity=granularity, since=since, until=until, unit=unit)
    units = await views.load_units(db)
    return [views.figures_view(r, units) for r in rows]


async def chargeback(db: Database, *, year: int, month: int, tenant: str | None = None) -> list[dict[str, Any]]:
    rows = await usage_monthly.chargeback(db, year=year, month=month)
    units = await views.load_units(db)
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["unit"]] = totals.get(r["unit"], 0) + int(r["cost"])
    items = []
    for r in rows:
        if tenant is not None and r["tenant"] != tenant:
            continue
        total = totals[r["unit"]]
        share = (Decimal(int(r["cost"])) * 100 / total) if total else Decimal(0)
        items.append({"tenant": r["tenant"], "year": year, "month": month, "unit": r["unit"],
                      "cost": units.fmt(r["cost"], r["unit"]), "events": int(r["events"]), "meters": int(r["meters"]),
                      "share_percent": str(share.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))})
    return items


async def accounts(db: Database, now: datetime) -> list[dict[str, Any]]:
    units = await views.load_units(db)
    soon = await balances.expiring(db, now)
    reserves = await balances.late_usage_reserves(db)
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for w in await balances.wallets(db):
        key = (w["tenant"], w["unit"])
        by_tenant.setdefault(w["tenant"], []).append(
            views.wallet_view(w, units, soon.get(key, 0), reserves.get(key, 0)))
    return [{"tenant": a["tenant"], "currency": a["currency"], "opened_at": a["opened_at"],
             "wallets": by_tenant.get(a["tenant"], [])} for a in await balances.accounts(db)]


async def ledger(db: Database, tenant: str | None) -> list[dict[str, Any]]:
    units = await views.load_units(db)
    return [{"ledger_account": r["ledger_account"], "unit": r["unit"], "balance": units.fmt(r["amount"], r["unit"])}
            for r in await balances.ledger_balances(db, tenant)]


def _period_filter(period: str | None) -> tuple[str | None, str | None]:
    """``YYYY-MM`` -> (exact month, None); ``YYYY`` -> (None, year prefix); checked (``params.month_or_year``)."""
    month, year = month_or_year(period, "period")
    return month, f"{year}-" if year else None


def _one_of(values: Sequence[str], known: Sequence[str], parameter: str) -> tuple[str, ...]:
    unknown = [v for v in values if v not in known]
    if unknown:
        raise invalid(f"unknown {parameter} {', '.join(unknown)}; known: {', '.join(known)}", parameter)
    return tuple(values)


async def invoice_list(db: Database, *, tenant: str | None, ledger_url: str, statuses: Sequence[str] = (),
                       types: Sequence[str] = (), period: str | None = None, subscription: str | None = None,
                       cursor: str | None = None, limit: int) -> Page:
    exact, prefix = _period_filter(period)
    rows = await invoices.page(db, tenant=tenant, statuses=_one_of(statuses, invoices.STATUSES, "status"),
                               types=_one_of(types, invoices.DOCUMENT_TYPES, "type"), period=exact,
                               year_prefix=prefix, subscription=subscription,
                               before_position=decode_cursor(cursor, "before"), limit=limit + 1)
    units = views.Units({})
    items = [views.invoice_view(r, units, ledger_url) for r in rows[:limit]]
    more = len(rows) > limit
    return items, encode_cursor({"before": int(rows[limit - 1]["drafted_position"])}) if more and items else None


async def invoice_detail(db: Database, *, tenant: str, invoice_id: str, ledger_url: str) -> dict[str, Any] | None:
    row = await invoices.one(db, tenant, invoice_id)
    if row is None:
        return None
    units = views.Units({})
    view = views.invoice_view(row, units, ledger_url)
    view["items"] = [views.invoice_line_view(line, units, row["currency"])
                     for line in await invoices.lines(db, invoice_id)]
    return view


async def subscription_list(db: Database, *, tenant: str | None, statuses: Sequence[str] = (),
                            plan: str | None = None, cursor: str | None = None, limit: int) -> Page:
    rows = await subscriptions.page(db, tenant=tenant, statuses=_one_of(statuses, subscriptions.STATUSES, "status"),
                                    plan=plan, after=decode_key_cursor(cursor, len(subscriptions.SORT_KEY)),
                                    limit=limit + 1)
    items = [views.subscription_view(r) for r in rows[:limit]]
    return items, _after(rows, limit, subscriptions.SORT_KEY)


async def mrr(db: Database, *, tenant: str | None, by_tenant: bool = False) -> list[dict[str, Any]]:
    units = views.Units({})
    return [views.mrr_view(r, units) for r in await subscriptions.mrr(db, tenant=tenant, by_tenant=by_tenant)]


def analytics_months(since: str | None, until: str | None, now: datetime) -> list[str]:
    """The months of ``from`` .. ``to`` (``YYYY-MM``, checked): by default ``to`` is this month (UTC) and ``from``
    the ``ANALYTICS_MONTHS_SHOWN``th month back to it; a month after this one is refused (it has no figures yet), as
    are ``from`` after ``to`` and more than ``ANALYTICS_MONTHS_MAX`` months."""
    this_month = (now.year, now.month)
    last = month_param(until, "to") or this_month
    if last > this_month:
        raise invalid(f"to is after this month ({this_month[0]:04d}-{this_month[1]:02d}, UTC): a month that has not "
                      "begun has no figures", "to")
    first = month_param(since, "from") or _months_back(last, ANALYTICS_MONTHS_SHOWN - 1)
    if first > last:
        raise invalid("from is after to", "from")
    labels = subscription_analytics.month_labels(first, last)
    if len(labels) > ANALYTICS_MONTHS_MAX:
        raise invalid(f"at most {ANALYTICS_MONTHS_MAX} months at once ({len(labels)} asked)", "from")
    return labels


def _months_back(month: tuple[int, int], count: int) -> tuple[int, int]:
    index = month[0] * 12 + month[1] - 1 - count
    return max((index // 12, index % 12 + 1), (1970, 1))


async def analytics(db: Database, *, tenant: str | None, months: list[str], now: datetime) -> list[dict[str, Any]]:
    units = views.Units({})
    first, last = (int(months[0][:4]), int(months[0][5:])), (int(months[-1][:4]), int(months[-1][5:]))
    rows = await subscription_analytics.analytics(db, tenant=tenant, first=first, last=last, now_text=utc_text(now))
    return [views.analytics_view(r, units) for r in rows]


@dataclass(frozen=True)
class RevenuePeriod:
    """The days a revenue report covers: [``start``, ``end``) (``YYYY-MM-DD``, UTC), within the month ``label``."""

    label: str  # YYYY-MM
    start: str
    end: str
    as_at: str | None  # YYYY-MM-DD: the report is as at the end of that day (the month to date)
    complete: bool  # the period has ended


def revenue_period(period: str | None, at: str | None, now: datetime) -> RevenuePeriod:
    """``period`` (a month ``YYYY-MM``; default this month, UTC) or ``at`` (a day ``YYYY-MM-DD``: its month up to the
    end of that day), checked: not both, not after this month or today (nothing is closed there yet)."""
    today = now.date()
    if period and at:
        raise invalid("give period (a month) or at (a day), not both", "at")
    day = day_param(at, "at")
    if day is not None:
        if day > today:
            raise invalid(f"at is after today ({today.isoformat()}, UTC): a day that has not ended has no close", "at")
        first = day.replace(day=1)
        return RevenuePeriod(f"{first.year:04d}-{first.month:02d}", first.isoformat(),
                             (day + timedelta(days=1)).isoformat(), day.isoformat(), day < today)
    year, month = month_param(period, "period") or (today.year, today.month)
    if (year, month) > (today.year, today.month):
        raise invalid(f"period is after this month ({today.year:04d}-{today.month:02d}, UTC): a month that has not "
                      "begun has no figures", "period")
    first = date(year, month, 1)
    following = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return RevenuePeriod(f"{year:04d}-{month:02d}", first.isoformat(), following.isoformat(), None,
                         following <= today)


async def revenue_report(db: Database, *, tenant: str | None, period: RevenuePeriod, by_tenant: bool = False
                         ) -> list[dict[str, Any]]:
    """The revenue report's lines: per unit (all tenants, or ``tenant``'s), or per tenant and unit (``by_tenant``)."""
    rows = await revenue.period_rows(db, start_day=period.start, end_day=period.end, tenant=tenant,
                                     by_tenant=by_tenant)
    return _revenue_views(rows, await views.load_units(db), period)


async def revenue_document(db: Database, *, tenant: str | None, period: RevenuePeriod, by_tenant: bool = False
                           ) -> dict[str, Any]:
    """The revenue report as ``GET /v1/reports/revenue`` answers it (``api_models.RevenueReport``) and
    ``billing reports revenue`` prints it: the period and its lines (:func:`revenue_report`)."""
    items = await revenue_report(db, tenant=tenant, period=period, by_tenant=by_tenant)
    return {"period": period.label, "as_at": period.as_at, "start": period.start, "end": period.end,
            "complete": period.complete, "items": items}


async def revenue_lines(db: Database, *, tenant: str | None, period: RevenuePeriod
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The revenue report's lines per unit and per tenant and unit, from one read (the dashboard shows both)."""
    rows = await revenue.period_rows(db, start_day=period.start, end_day=period.end, tenant=tenant)
    totals: dict[str, dict[str, Any]] = {}
    for r in rows:
        total = totals.setdefault(r["unit"], {"tenant": None, "unit": r["unit"],
                                              **dict.fromkeys(revenue.REPORT_AMOUNTS, 0)})
        for name in revenue.REPORT_AMOUNTS:
            total[name] += r[name]
    units = await views.load_units(db)
    return _revenue_views([totals[unit] for unit in sorted(totals)], units, period), _revenue_views(rows, units, period)


def _revenue_views(rows: list[dict[str, Any]], units: views.Units, period: RevenuePeriod) -> list[dict[str, Any]]:
    """Lines with a figure (a tenant-unit neither deferring nor recognising anything in the period is left out)."""
    return [views.revenue_view(r, units, period.label) for r in rows
            if any(r[name] for name in revenue.REPORT_AMOUNTS)]
