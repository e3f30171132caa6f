"""Read model: monthly usage summaries per tenant (organisation), month and meter (usage type).

Rows are keyed by meter; each also names the meter's reporting category (``usage_type`` from the rating
decision, e.g. ai, compute). A usage debit adds its metered quantity (from the rating decision in its ``cause``) and
its cost (the debit's amount; give-backs are negative) to the month of its usage time: in the time zone of the
subscription periods that bill it when rating names one (``cause.time_zone``, since session 11: the invoice's month),
else UTC (debits recorded before, accounts billed by calendar month, UTC subscriptions). The metered quantity is
what the event added to the meter's total, as the invoice counts it (``cause.contribution``, since session 9): a
``sum`` meter's event its quantity, a ``count`` meter's event 1 whatever its quantity, a correction the difference it
made (500 amended to 700 is 200 more, not 700; a count meter's amendment 0, its void -1), as its cost does; a close
debit (``cause.closed``) its line's quantity. ``cause.quantity`` stays the event's own quantity (the history shows
it). A debit recorded before ``contribution`` existed takes what it moved rating's running total by
(``quantity_after - quantity_before``, as the close counts real-time meters), else the difference a correction
made (``quantity_new - quantity_old``), else its quantity. A captured hold is consumption too: its cost is added
under its meter (``holds`` when it had none), with no quantity, in the month of its capture time in the zone the
ledger names on it (``HoldCaptured.time_zone``, since session 12: the zone a debit at that instant names), else UTC.

Usage that cost nothing (inside the allowance, a flat fee or stairstep band already charged, a trial) reaches the
ledger as a debit of 0 (no postings, since session 9): its quantity counts here with a cost of 0, so the month's
quantity is the quantity used, as the invoice shows it. ``events`` counts usage events: one per debit, and for the
close debit of a ``max``/``last``/``unique_count`` meter (``cause.closed``) the events its line counted
(``cause.event_count``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_projections.facts import Fact, decimal_or_none, first_text, month_of
from billing_projections.writer import DEC_SUM, INT_SUM, BatchWriter, Handler, Table, value
from billing_runtime.db import Database

USAGE_MONTHLY = Table("usage_monthly", {"tenant": "TEXT", "period": "TEXT", "meter": "TEXT", "unit": "TEXT"}, {
    "usage_type": value("TEXT"), "quantity": DEC_SUM, "cost": INT_SUM, "events": INT_SUM,
    "last_position": value("BIGINT"),
}, indexes=("period, tenant",))
TABLES = (USAGE_MONTHLY,)

HOLD_METER = "holds"


def handler_for(event_type: str) -> Handler | None:
    return project if event_type in ("BillingAccount.UsageDebited", "BillingAccount.HoldCaptured") else None


def project(fact: Fact, w: BatchWriter) -> None:
    # A usage debit takes debits.project, which writes what this does in one pass with the other read models:
    # a change here goes there too (tests/unit/projections/test_debits.py compares the two).
    if fact.aggregate != "BillingAccount" or not fact.tenant:
        return
    if fact.name == "UsageDebited":
        quantity = metered_quantity(fact.cause)
        meter = str(fact.data["meter"])
        zone = fact.cause.get("time_zone")
    elif fact.name == "HoldCaptured":
        quantity, meter = 0, str(fact.data.get("meter") or HOLD_METER)
        zone = fact.data.get("time_zone")  # named by the ledger since session 12 (no cause: not rated)
    else:
        return
    usage_type = first_text(fact.cause.get("usage_type")) or meter
    w.upsert(USAGE_MONTHLY, (fact.tenant, month_of(fact.occurred_at, zone), meter, str(fact.data["unit"])),
             add={"quantity": quantity, "cost": int(fact.data["amount"]), "events": counted_events(fact.cause)},
             set={"usage_type": usage_type, "last_position": fact.position})


def metered_quantity(cause: dict[str, Any]) -> Decimal | int:
    """The quantity a usage debit adds to its month: what its event added to the meter's total (module docstring)."""
    if "contribution" in cause:
        contributed = decimal_or_none(cause["contribution"])
        if contributed is not None:
            return contributed
    elif not cause.get("closed") and "ai_prices" not in cause:
        # Recorded before rating sent ``contribution``: a real-time meter's debit moved the meter's running total by
        # after - before (a count meter's event by 1). An AI meter's totals count tokens, not its quantity.
        before, after = decimal_or_none(cause.get("quantity_before")), decimal_or_none(cause.get("quantity_after"))
        if before is not None and after is not None:
            return after - before
    if cause.get("corrects"):
        new, old = decimal_or_none(cause.get("quantity_new")), decimal_or_none(cause.get("quantity_old"))
        if new is not None and old is not None:
            return new - old
    return decimal_or_none(cause.get("quantity")) or 0


def counted_events(cause: dict[str, Any]) -> int:
    """The usage events a debit stands for: the events a close debit's line counted, none for rating's adjustment
    after a refused debit (``refusal_of``: it re-prices usage already counted), else one."""
    if cause.get("refusal_of"):
        return 0
    if cause.get("closed"):
        count = cause.get("event_count")
        if type(count) is int and count >= 0:
            return count
    return 1


def period(year: int | None, month: int | None) -> tuple[str | None, str | None]:
    """(exact period, year prefix) for filters: 2026 + 11 -> ("2026-11", None); 2026 alone -> (None, "2026-")."""
    if year is not None and month is not None:
        return f"{year:04d}-{month:02d}", None
    if year is not None:
        return None, f"{year:04d}-"
    return None, None


SORT_KEY = ("period", "tenant", "meter", "unit")  # newest month first, then by tenant, meter, unit: the row's key


async def summaries(db: Database, *, tenant: str | None, year: int | None, month: int | None,
                    meter: str | None, after: tuple[str, ...] | None = None, limit: int) -> list[dict[str, Any]]:
    """In ``SORT_KEY`` order; keyset: the rows after ``after`` (the previous page's last row's ``SORT_KEY``), so a
    row added between two pages moves no other row from one page to another (an offset would repeat or skip one)."""
    where, args = _filters(tenant, year, month, meter)
    if after is not None:
        args += list(after)
        p, t, m, u = (f"${i}" for i in range(len(args) - 3, len(args) + 1))
        where += (" AND " if where else "WHERE ") + f"(period < {p} OR (period = {p} AND (tenant, meter, unit) > ({t}, {m}, {u})))"
    args.append(limit)
    return await db.fetch(
        "SELECT tenant, period, meter, unit, usage_type, quantity, cost, events FROM usage_monthly "
        f"{where} ORDER BY period DESC, tenant, meter, unit LIMIT ${len(args)}", *args)


async def chargeback(db: Database, *, year: int, month: int, tenant: str | None = None) -> list[dict[str, Any]]:
    """Per tenant and unit: the month's cost and events, summed over meters (for internal chargebacks)."""
    where, args = _filters(tenant, year, month, None)
    return await db.fetch(
        f"SELECT tenant, unit, SUM(cost) AS cost, SUM(events) AS events, COUNT(*) AS meters FROM usage_monthly "
        f"{where} GROUP BY tenant, unit ORDER BY tenant, unit", *args)


def _filters(tenant: str | None, year: int | None, month: int | None, meter: str | None
             ) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    exact, prefix = period(year, month)
    for sql, arg in (("tenant = ?", tenant), ("period = ?", exact), ("period LIKE ?", prefix + "%" if prefix else None),
                     ("meter = ?", meter)):
        if arg is not None:
            args.append(arg)
            where.append(sql.replace("?", f"${len(args)}"))
    if month is not None and year is None:
        args.append(f"%-{month:02d}")
        where.append(f"period LIKE ${len(args)}")
    return ("WHERE " + " AND ".join(where)) if where else "", args
