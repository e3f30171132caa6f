"""Period close: aggregate each meter by its rule, subtract allowances, price, and record invoice lines.

Closing is idempotent: the lines of a (period, account) are written once (later runs read them back), and
the charges that only the close can compute (``max``, ``last``, ``unique_count`` meters) are posted with a
command id derived from (account, meter, group, period), which the ledger refuses a second time. Every
line keeps the trace to its raw events (``rated_events`` of the same period, meter and group).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.money import from_subunits
from billing_events.timeutil import utcnow
from billing_rating.aggregation import REAL_TIME, Observation, aggregate
from billing_rating.catalog_view import CatalogView
from billing_rating.pricing import period_charge
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.db import Database

CLOSE_SCHEMA = """
CREATE TABLE IF NOT EXISTS close_lines (
    period TEXT NOT NULL, account_id TEXT NOT NULL, tenant TEXT NOT NULL, meter TEXT NOT NULL,
    group_key TEXT NOT NULL, line TEXT NOT NULL, closed_at TEXT NOT NULL,
    PRIMARY KEY (period, account_id, meter, group_key));
CREATE TABLE IF NOT EXISTS closed_periods (
    period TEXT NOT NULL, account_id TEXT NOT NULL, closed_at TEXT NOT NULL, PRIMARY KEY (period, account_id));
"""

TRACE_EVENT_IDS_MAX = 100  # ids listed on the line itself; the full trace is rated_events


@dataclass(frozen=True)
class CloseLine:
    period: str
    tenant: str
    meter: str
    group: str
    aggregation: str
    quantity: str
    included: str
    billable: str
    unit: str | None
    amount_subunits: int
    amount: str
    charged_in_real_time_subunits: int
    charged_at_close_subunits: int
    event_count: int
    event_ids: list[str]
    catalog_version: int


async def close_period(db: Database, bus: Bus, catalog: CatalogView, period: str,
                       now: datetime | None = None) -> list[CloseLine]:
    """Closes ``period`` for every account that has rated usage in it; returns all its lines."""
    now = now or utcnow()
    rows = await db.fetch(
        "SELECT account_id, tenant, meter, group_key, event_id, event_time, quantity, value, amount_subunits, "
        "decision, corrects, effective_quantity FROM rated_events WHERE period = $1 AND decision IN ('priced', 'deferred_to_close', 'late:priced', "
        "'late:deferred_to_close', 'late_adjustment:priced', 'late_adjustment:deferred_to_close') "
        "ORDER BY account_id, meter, group_key, event_time", period)
    done = {(r["account_id"]) for r in await db.fetch(
        "SELECT account_id FROM closed_periods WHERE period = $1", period)}
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["account_id"], row["tenant"], row["meter"], row["group_key"]), []).append(row)
    commands: list[OutMessage] = []
    async with db.transaction() as conn:
        for (account, tenant, meter_code, group), items in groups.items():
            if account in done:
                continue
            line, command = _line(catalog, period, account, tenant, meter_code, group, items)
            await conn.execute(
                "INSERT INTO close_lines (period, account_id, tenant, meter, group_key, line, closed_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                period, account, tenant, meter_code, group, json.dumps(asdict(line)), now.isoformat())
            if command is not None:
                commands.append(command)
        for account in {key[0] for key in groups} - done:
            await conn.execute("INSERT INTO closed_periods (period, account_id, closed_at) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", period, account, now.isoformat())
    await bus.publish(commands)
    return await lines_of(db, period)


async def lines_of(db: Database, period: str, tenant: str | None = None) -> list[CloseLine]:
    if tenant is None:
        rows = await db.fetch("SELECT line FROM close_lines WHERE period = $1 ORDER BY tenant, meter, group_key",
                              period)
    else:
        rows = await db.fetch("SELECT line FROM close_lines WHERE period = $1 AND tenant = $2 "
                              "ORDER BY meter, group_key", period, tenant)
    return [CloseLine(**json.loads(r["line"])) for r in rows]


def _line(catalog: CatalogView, period: str, account: str, tenant: str, meter_code: str, group: str,
          items: list[dict[str, Any]]) -> tuple[CloseLine, OutMessage | None]:
    meter = catalog.meters[meter_code]
    definition = meter.definition
    if definition.aggregation not in REAL_TIME:
        # A corrected event counts with its latest corrected value; real-time meters carry deltas instead.
        superseded = {r["corrects"] for r in items if r["corrects"]}
        latest: dict[str, dict[str, Any]] = {}
        for r in items:
            if r["corrects"]:
                latest[r["corrects"]] = {**r, "quantity": r["effective_quantity"]}
        items = [r for r in items if not r["corrects"] and r["event_id"] not in superseded] + list(latest.values())
        items = [r for r in items if Decimal(r["quantity"]) != 0 or definition.aggregation == "last"]
    observations = [
        Observation(r["event_id"], datetime.fromisoformat(r["event_time"]), Decimal(r["quantity"]), r["value"])
        for r in items
    ]
    quantity = aggregate(definition, observations)
    real_time = sum(int(r["amount_subunits"]) for r in items)
    unit = meter.spec.unit if meter.spec else (meter.ai_table.unit if meter.ai_table else None)
    if meter.ai_table is not None:
        total = real_time  # linear per-token prices: the real-time increments are the period price
        billable = quantity
    else:
        assert meter.spec is not None
        total = period_charge(meter.spec, quantity, definition.included)
        billable = max(Decimal(0), quantity - definition.included)
    at_close = 0 if definition.aggregation in REAL_TIME else total
    line = CloseLine(
        period=period, tenant=tenant, meter=meter_code, group=group, aggregation=definition.aggregation,
        quantity=str(quantity), included=str(definition.included), billable=str(billable), unit=unit,
        amount_subunits=total, amount=str(from_subunits(total)), charged_in_real_time_subunits=real_time,
        charged_at_close_subunits=at_close, event_count=len(items),
        event_ids=[r["event_id"] for r in items[:TRACE_EVENT_IDS_MAX]], catalog_version=catalog.version,
    )
    command = None
    if at_close and unit:
        command_id = ids.command_id("usage.close", account, meter_code, group, period)
        message = LedgerCommand(
            command_id=command_id, kind="usage.debit", tenant=tenant, issued_at=utcnow(), issued_by="service:rating",
            payload={"unit": unit, "amount_subunits": at_close, "amount": str(from_subunits(at_close)),
                     "meter": meter_code, "at": max(o.at for o in observations).isoformat(),
                     "overage_policy": "overage",  # the usage already happened: a close never refuses
                     "cause": {"period": period, "aggregation": definition.aggregation, "quantity": str(quantity),
                               "group": group, "event_ids": line.event_ids, "event_count": len(items),
                               "usage_type": definition.usage_type or meter_code,
                               "catalog_version": catalog.version, "price": definition.price,
                               "included": str(definition.included), "closed": True}})
        command = OutMessage(topics.LEDGER_COMMANDS, account, message.to_json(), (("schema", b"ledger.command/v1"),))
    return line, command
