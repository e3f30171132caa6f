"""What rating knows of subscriptions (learnt from ``billing.ledger.events``): which plan prices a meter
for an account, the account's billing period, and the usage lines of an ended period.

Rules (documented in docs/rating.md):
* A meter is priced by the charge of the account's earliest-started live subscription whose plan has a
  charge for it; allowances (``included``) of every live subscription charging that meter pool together.
  Without such a subscription, the meter's list price applies.
* Usage while the pricing subscription is trialing is recorded but not charged.
* The billing period of usage is the primary (earliest-started live) subscription's current period; an
  account without a subscription is billed by calendar month (UTC).
* When a subscription's period ends, rating closes it (the meters priced only at close: max, last,
  unique_count) and sends the period's usage lines for the renewal invoice (``invoice.usage_lines``): only
  the primary subscription's invoice carries usage, others get none. The ended period's bounds are kept
  (``subscription_periods``): an event of that period arriving later follows its meter's late policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import topics
from billing_events.messages import LedgerCommand, LedgerEvent
from billing_events.money import RATING_CONTEXT, is_currency_code
from billing_events.timeutil import utcnow
from billing_rating.aggregation import REAL_TIME, period_of
from billing_rating.close import CloseLine
from billing_rating.text import decimal_text, subunits_text
from billing_runtime.bus import OutMessage
from billing_runtime.db import Connection

SCHEMA = """
CREATE TABLE IF NOT EXISTS account_subscriptions (
    subscription_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, tenant TEXT NOT NULL, plan_code TEXT NOT NULL,
    plan_version INTEGER NOT NULL, quantity INTEGER NOT NULL, status TEXT NOT NULL, started_at TEXT NOT NULL,
    period_start TEXT NOT NULL, period_end TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS account_subscriptions_account ON account_subscriptions (account_id);
CREATE TABLE IF NOT EXISTS subscription_periods (
    account_id TEXT NOT NULL, period TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    subscription_id TEXT NOT NULL, PRIMARY KEY (account_id, period));
"""

LIVE = ("trialing", "active", "past_due", "paused")
TRACE_EVENT_IDS_MAX = 100  # raw event ids listed on an invoice line; the rest via rating's decisions route
STATUS_BY_EVENT = {"Paused": "paused", "Resumed": "active", "PastDue": "past_due", "Recovered": "active",
                   "Canceled": "canceled", "TrialConverted": "active"}


@dataclass(frozen=True)
class AccountSubscription:
    subscription_id: str
    plan_code: str
    plan_version: int
    quantity: int
    status: str
    started_at: str
    period_start: datetime
    period_end: datetime


async def load_for(conn: Connection, accounts: Sequence[str], dialect: str = "") -> dict[str, list[AccountSubscription]]:
    """Live subscriptions per account, earliest-started first."""
    return (await load_subscriptions(conn, accounts, dialect))[0]


async def load_subscriptions(conn: Connection, accounts: Sequence[str], dialect: str = ""
                             ) -> tuple[dict[str, list[AccountSubscription]], set[str]]:
    """(live subscriptions per account, earliest-started first; the accounts that have had any subscription).

    On PostgreSQL (``dialect="postgres"``) the accounts are one array parameter: one prepared statement
    whatever their number, instead of a new statement text (and plan) per batch size.
    """
    if not accounts:
        return {}, set()
    where, args = _accounts_where(accounts, dialect)
    rows = await conn.fetch(
        f"SELECT * FROM account_subscriptions WHERE {where} ORDER BY started_at, subscription_id", *args)
    result: dict[str, list[AccountSubscription]] = {}
    subscribed: set[str] = set()
    for r in rows:
        subscribed.add(r["account_id"])
        if r["status"] not in LIVE:
            continue
        result.setdefault(r["account_id"], []).append(AccountSubscription(
            r["subscription_id"], r["plan_code"], int(r["plan_version"]), int(r["quantity"]), r["status"],
            r["started_at"], datetime.fromisoformat(r["period_start"]), datetime.fromisoformat(r["period_end"])))
    return result, subscribed


async def ended_periods(conn: Connection, accounts: Sequence[str], dialect: str = ""
                        ) -> dict[str, list[tuple[datetime, datetime, str]]]:
    """The ended (and closed) subscription periods of ``accounts``: (start, end, period key) each."""
    if not accounts:
        return {}
    where, args = _accounts_where(accounts, dialect)
    result: dict[str, list[tuple[datetime, datetime, str]]] = {}
    for r in await conn.fetch(f"SELECT account_id, period, period_start, period_end FROM subscription_periods "
                              f"WHERE {where}", *args):
        result.setdefault(r["account_id"], []).append(
            (datetime.fromisoformat(r["period_start"]), datetime.fromisoformat(r["period_end"]), r["period"]))
    return result


async def record_ended_period(conn: Connection, account: str, ended: AccountSubscription) -> None:
    """Keeps the bounds of a closed subscription period, so later events of it are known to be late."""
    await conn.execute(
        "INSERT INTO subscription_periods (account_id, period, period_start, period_end, subscription_id) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, period) DO NOTHING", account,
        ended.period_start.isoformat(), ended.period_start.isoformat(), ended.period_end.isoformat(),
        ended.subscription_id)


def _accounts_where(accounts: Sequence[str], dialect: str) -> tuple[str, list[Any]]:
    if dialect == "postgres":
        return "account_id = ANY($1::text[])", [list(accounts)]
    return f"account_id IN ({', '.join(f'${i}' for i in range(1, len(accounts) + 1))})", list(accounts)


async def apply_event(conn: Connection, event: LedgerEvent) -> AccountSubscription | None:
    """Updates the table from one Subscription event; returns the subscription when a period ended."""
    name = event.type.removeprefix("Subscription.")
    data = event.data
    sid = str(event.aggregate_id)
    if name == "Started":
        from billing_events import ids

        await conn.execute(
            "INSERT INTO account_subscriptions (subscription_id, account_id, tenant, plan_code, plan_version, quantity, "
            "status, started_at, period_start, period_end) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (subscription_id) DO NOTHING",
            sid, str(ids.account_id(data["tenant"])), data["tenant"], data["plan"]["code"],
            int(data["plan"]["version"]), int(data["quantity"]), data["status"], data["started_at"],
            data["period_start"], data["period_end"])
    elif name == "Changed":
        await conn.execute(
            "UPDATE account_subscriptions SET plan_code = $2, plan_version = $3, quantity = $4, period_start = $5, "
            "period_end = $6 WHERE subscription_id = $1", sid, data["plan"]["code"], int(data["plan"]["version"]),
            int(data["quantity"]), data["period_start"], data["period_end"])
    elif name == "PeriodEnded":
        row = await conn.fetchrow("SELECT * FROM account_subscriptions WHERE subscription_id = $1", sid)
        if data.get("next_start"):
            await conn.execute("UPDATE account_subscriptions SET period_start = $2, period_end = $3 "
                               "WHERE subscription_id = $1", sid, data["next_start"], data["next_end"])
        if row is not None:
            return AccountSubscription(sid, row["plan_code"], int(row["plan_version"]), int(row["quantity"]),
                                       row["status"], row["started_at"], datetime.fromisoformat(data["period_start"]),
                                       datetime.fromisoformat(data["period_end"]))
    elif name in STATUS_BY_EVENT:
        await conn.execute("UPDATE account_subscriptions SET status = $2 WHERE subscription_id = $1", sid,
                           STATUS_BY_EVENT[name])
        if name == "TrialConverted":
            await conn.execute("UPDATE account_subscriptions SET period_start = $2, period_end = $3 "
                               "WHERE subscription_id = $1", sid, data["period_start"], data["period_end"])
    return None


async def usage_lines_command(conn: Connection, ended: AccountSubscription, tenant: str, account: str,
                              meter_names: dict[str, dict[str, Any]], primary: bool,
                              closed: Sequence[CloseLine] = ()) -> OutMessage:
    """``invoice.usage_lines`` for the renewal invoice of ``ended`` (usage only on the primary subscription).

    Real-time meters (sum, count, AI tokens): the amounts rating posted for the period's decisions, and the
    quantity by which they moved the period's running totals (a correction counts by its difference, a
    count meter by one per event). The period's decisions are those under its key, late events of earlier
    periods included, and those of its time span rated by calendar month (before rating knew of the
    subscription). Meters priced at close (max, last, unique_count): the ``closed`` lines of the period.
    """
    lines: list[dict[str, Any]] = []
    if primary:
        key = ended.period_start.isoformat()
        months = _months(ended.period_start, ended.period_end)
        periods = [key, *months]
        rows = await conn.fetch(
            "SELECT event_id, meter, unit, quantity_before, quantity_after, amount_subunits, event_time, period "
            f"FROM rated_events WHERE account_id = $1 AND period IN ({', '.join(f'${i + 2}' for i in range(len(periods)))}) "
            "AND decision LIKE '%priced' ORDER BY event_time, event_id", account, *periods)
        totals: dict[tuple[str, str], tuple[Decimal, int, list[str], set[str], int]] = {}
        for r in rows:
            if r["period"] != key and not (
                    ended.period_start <= datetime.fromisoformat(r["event_time"]) < ended.period_end):
                continue  # a calendar month's decision outside the subscription's period
            meter_unit = (r["meter"], r["unit"] or "")
            quantity, amount, event_ids, seen, events = totals.get(meter_unit, (Decimal(0), 0, [], set(), 0))
            if len(event_ids) < TRACE_EVENT_IDS_MAX:
                event_ids.append(r["event_id"])
            seen.add(r["period"])
            moved = RATING_CONTEXT.subtract(Decimal(r["quantity_after"]), Decimal(r["quantity_before"]))
            totals[meter_unit] = (RATING_CONTEXT.add(quantity, moved), amount + int(r["amount_subunits"]),
                                  event_ids, seen, events + 1)
        for line in closed:
            if line.aggregation in REAL_TIME:
                continue  # priced in real time: its decisions above
            meter_unit = (line.meter, line.unit or "")
            quantity, amount, event_ids, seen, events = totals.get(meter_unit, (Decimal(0), 0, [], set(), 0))
            event_ids.extend(line.event_ids[:TRACE_EVENT_IDS_MAX - len(event_ids)])
            seen.add(line.period)
            totals[meter_unit] = (RATING_CONTEXT.add(quantity, Decimal(line.quantity)),
                                  amount + line.charged_at_close_subunits, event_ids, seen, events + line.event_count)
        for (meter, unit), (quantity, amount, event_ids, seen, events) in sorted(totals.items()):
            meta = meter_names.get(meter, {})
            label = f"{meta.get('name') or meter}: {decimal_text(quantity)} {meta.get('unit_of_measure', 'units')}"
            # The trace: rating's decisions (GET /v1/rating/periods/{period}/accounts/{tenant}/decisions)
            # of these periods and events explain the line down to each raw event.
            trace = {"rating_periods": sorted(seen), "event_ids": event_ids, "events": events}
            if is_currency_code(unit):
                lines.append({"kind": "usage", "description": label, "amount": subunits_text(amount),
                              "meter": meter, "quantity": decimal_text(quantity), "trace": trace})
            else:
                lines.append({"kind": "usage", "description": f"{label} (paid with {subunits_text(amount)} {unit})",
                              "amount": "0", "meter": meter, "quantity": decimal_text(quantity), "trace": trace})
    invoice_key = f"{ended.subscription_id}/{ended.period_end.isoformat()}"
    command = LedgerCommand(
        command_id=uuid5(NAMESPACE_URL, f"/usage-lines/{ended.subscription_id}/{ended.period_end.isoformat()}"),
        kind="invoice.usage_lines", tenant=tenant, issued_at=utcnow(), issued_by="service:rating",
        payload={"invoice_key": invoice_key, "lines": lines, "period_start": ended.period_start.isoformat(),
                 "period_end": ended.period_end.isoformat()})
    return OutMessage(topics.LEDGER_COMMANDS, account, command.to_json(), (("schema", b"ledger.command/v1"),))


def _months(start: datetime, end: datetime) -> list[str]:
    """The calendar months (``YYYY-MM``, UTC) that overlap [start, end)."""
    months: list[str] = []
    month = period_of(start)
    last = period_of(end - timedelta(microseconds=1))
    while True:
        months.append(month)
        if month >= last:
            return months
        year, number = int(month[:4]), int(month[5:])
        month = f"{year + number // 12}-{number % 12 + 1:02d}"


def subscription_uuid(value: str) -> UUID:
    return UUID(value)
