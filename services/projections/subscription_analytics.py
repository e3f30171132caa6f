"""Subscription analytics per calendar month: new, expansion, contraction and churned MRR, logo and revenue churn,
net revenue retention, per currency. Computed when asked from ``subscription_changes`` (services/projections/README.md
"Subscription analytics" defines every figure).

A month is a UTC calendar month, [its 1st 00:00Z, the next month's 1st 00:00Z), as the finance figures count months.
A customer is an account (tenant) in one currency. Its ARR at an instant is the sum of ``arr`` of its subscriptions
whose status then is ``active`` or ``past_due`` (what MRR counts), each subscription's changes applied in recorded
order up to that instant; it is *live* when that ARR is above zero. Each month compares every customer's ARR at the
month's start with its ARR at its end, so changes within the month net out: up then down again is nothing, a
subscription started and canceled within the month is nothing, a pause resumed within the month is nothing.

Sums are exact ARR (no division); each MRR figure is its ARR / 12 rounded once, half-up, to the currency's minor unit
(``subscriptions.mrr_of``, as ``/v1/reports/mrr``), and each ratio is computed from the exact sums and rounded once,
half-up, to ``RATIO_PLACES`` fractional digits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from itertools import groupby
from operator import itemgetter
from typing import Any

from billing_events.money import RATING_CONTEXT
from billing_projections import subscription_changes
from billing_projections.subscriptions import BILLABLE, mrr_of
from billing_runtime.db import Database

RATIO_PLACES = 4  # ratios as fractions (0.0500 is 5 %), this many digits, rounded half-up once
_RATIO_QUANTUM = Decimal(1).scaleb(-RATIO_PLACES)
_ZERO = Decimal(0)

Customer = tuple[str, str]  # (tenant, currency)


def month_labels(first: tuple[int, int], last: tuple[int, int]) -> list[str]:
    """``YYYY-MM`` of every month from ``first`` to ``last`` (year, month), both included."""
    year, month = first
    labels = []
    while (year, month) <= last:
        labels.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return labels


def month_bounds(labels: list[str]) -> list[str]:
    """The instants (stored UTC time texts) the months start at, then the end of the last one."""
    if not labels:
        return []
    year, month = int(labels[-1][:4]), int(labels[-1][5:7])
    after = f"{year + 1:04d}-01" if month == 12 else f"{year:04d}-{month + 1:02d}"
    return [f"{label}-01T00:00:00.000000Z" for label in (*labels, after)]


def arr_at(changes: Iterable[Mapping[str, Any]], bounds: list[str]) -> dict[Customer, list[Decimal]]:
    """Each customer's billable ARR at each of ``bounds`` (ascending instants). ``changes``:
    ``subscription_changes.rows``, each subscription's rows together, in recorded order. Customers never live at any
    bound are left out."""
    totals: dict[Customer, list[Decimal]] = {}
    for _, group in groupby(changes, key=itemgetter("subscription_id")):
        rows = list(group)
        values = _subscription_arr(rows, bounds)
        if not any(values):
            continue
        customer = (rows[0]["tenant"], rows[0]["currency"])
        found = totals.get(customer)
        if found is None:
            totals[customer] = values
        else:
            totals[customer] = [RATING_CONTEXT.add(a, b) for a, b in zip(found, values, strict=True)]
    return totals


def _subscription_arr(rows: Iterable[Mapping[str, Any]], bounds: list[str]) -> list[Decimal]:
    """One subscription's billable ARR at each bound: the state its changes effective before the bound leave (0 when
    not ``active`` or ``past_due``). A change dated before one recorded before it takes effect at that one's time,
    so the state at any instant after the last change is the ledger's state now."""
    values: list[Decimal] = []
    status: str | None = None
    arr = effective = None
    for row in rows:
        at = row["effective_at"] if effective is None else max(row["effective_at"], effective)
        while len(values) < len(bounds) and bounds[len(values)] <= at:
            values.append(_billable(status, arr))
        effective = at
        if row["status"] is not None:
            status = row["status"]
        if row["arr"] is not None:
            arr = Decimal(row["arr"])
    return values + [_billable(status, arr)] * (len(bounds) - len(values))


def _billable(status: str | None, arr: Decimal | None) -> Decimal:
    return arr if status in BILLABLE and arr is not None and arr > 0 else _ZERO


def months(totals: Mapping[Customer, list[Decimal]], labels: list[str], now_text: str) -> list[dict[str, Any]]:
    """The figures of each month and currency, by month then currency; a month and currency without a customer
    live at its start or end is left out. ``complete``: the month has ended by ``now_text`` (a month in progress is
    counted to date)."""
    bounds = month_bounds(labels)
    found: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        by_currency: dict[str, _Month] = {}
        for (_, code), values in totals.items():
            month = by_currency.get(code)
            if month is None:
                month = by_currency[code] = _Month()
            month.count(values[i], values[i + 1])
        found += [by_currency[code].figures(label, code, complete=bounds[i + 1] <= now_text)
                  for code in sorted(by_currency) if by_currency[code].counts["accounts_start"]
                  or by_currency[code].counts["accounts_end"]]
    return found


class _Month:
    """One month's sums of one currency: customer counts, and exact ARR per movement."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(("accounts_start", "accounts_new", "accounts_churned", "accounts_end"), 0)
        self.sums = dict.fromkeys(("start", "new", "expansion", "contraction", "churned", "end"), _ZERO)

    def _add(self, name: str, amount: Decimal) -> None:
        self.sums[name] = RATING_CONTEXT.add(self.sums[name], amount)

    def count(self, start: Decimal, end: Decimal) -> None:
        """One customer's ARR at the month's start and end: which movement the difference is."""
        if start > 0:
            self.counts["accounts_start"] += 1
            self._add("start", start)
            if end == 0:
                self.counts["accounts_churned"] += 1
                self._add("churned", start)
            elif end > start:
                self._add("expansion", RATING_CONTEXT.subtract(end, start))
            else:
                self._add("contraction", RATING_CONTEXT.subtract(start, end))
        elif end > 0:
            self.counts["accounts_new"] += 1
            self._add("new", end)
        if end > 0:
            self.counts["accounts_end"] += 1
            self._add("end", end)

    def figures(self, label: str, code: str, *, complete: bool) -> dict[str, Any]:
        sums, counts = self.sums, self.counts
        start = sums["start"]
        lost = RATING_CONTEXT.add(sums["contraction"], sums["churned"])
        retained = RATING_CONTEXT.subtract(RATING_CONTEXT.add(start, sums["expansion"]), lost)
        return {
            "month": label, "currency": code, "complete": complete, **counts,
            **{f"mrr_{name}": mrr_of(amount, code) for name, amount in sums.items()},
            "logo_churn_rate": _ratio(Decimal(counts["accounts_churned"]), Decimal(counts["accounts_start"])),
            "revenue_churn_rate": _ratio(lost, start),
            "net_revenue_retention": _ratio(retained, start),
        }


def _ratio(part: Decimal, whole: Decimal) -> Decimal | None:
    if whole <= 0:
        return None  # no customer live at the month's start: nothing to churn or retain
    return RATING_CONTEXT.divide(part, whole).quantize(_RATIO_QUANTUM, rounding=ROUND_HALF_UP,
                                                        context=RATING_CONTEXT)


async def analytics(db: Database, *, tenant: str | None, first: tuple[int, int], last: tuple[int, int],
                    now_text: str) -> list[dict[str, Any]]:
    """The months ``first`` .. ``last`` (year, month) of ``tenant``'s subscriptions (None: every tenant's)."""
    labels = month_labels(first, last)
    rows = await subscription_changes.rows(db, tenant=tenant)
    return months(arr_at(rows, month_bounds(labels)), labels, now_text)
