"""Period close: aggregate each meter by its rule, subtract allowances, price, and record invoice lines.

Closing is idempotent: the lines of a (period, account) are written once (later runs read them back), and
the charges that only the close can compute (``max``, ``last``, ``unique_count`` meters) are posted with a
command id derived from (account, meter, group, period), which the ledger refuses a second time. Every
line keeps the trace to its raw events (``rated_events`` of the same period, meter and group).

Two kinds of period are closed. A calendar month (``YYYY-MM``, accounts without a subscription) is closed
by ``POST /v1/rating/periods/{period}/close`` at the meters' list prices (:func:`close_period`), once the UTC
month has ended (the route refuses the current month and later ones). A
subscription's period (its start, ISO 8601) is closed by rating itself when the ledger says the period
ended (``Subscription.PeriodEnded``), before the renewal invoice's usage lines are sent, at the price real-
time rating used: the plan's charge and pooled allowance, nothing while in a trial at the period's end
(:func:`close_account_period`, pricing from ``RatingService._pricing``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from itertools import pairwise
from typing import Any
from uuid import UUID

from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.money import RATING_CONTEXT
from billing_events.timeutil import utcnow
from billing_rating import repricing
from billing_rating.aggregation import REAL_TIME, Observation, aggregate, contribution
from billing_rating.catalog_view import CatalogView, MeterView
from billing_rating.pricing import is_per_event, period_charge
from billing_rating.text import decimal_text, subunits_text
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.db import Connection, Database

CLOSE_SCHEMA = """
CREATE TABLE IF NOT EXISTS close_lines (
    period TEXT NOT NULL, account_id TEXT NOT NULL, tenant TEXT NOT NULL, meter TEXT NOT NULL,
    group_key TEXT NOT NULL, line TEXT NOT NULL, closed_at TEXT NOT NULL,
    PRIMARY KEY (period, account_id, meter, group_key));
CREATE TABLE IF NOT EXISTS closed_periods (
    period TEXT NOT NULL, account_id TEXT NOT NULL, closed_at TEXT NOT NULL, PRIMARY KEY (period, account_id));
"""

TRACE_EVENT_IDS_MAX = 100  # ids listed on the line itself; the full trace is rated_events
# The decisions whose usage a close counts (trial usage, filtered and refused events are not billed).
CLOSE_DECISIONS = ("priced", "deferred_to_close", "late:priced", "late:deferred_to_close", "late_adjustment:priced",
                   "late_adjustment:deferred_to_close")
_CLOSE_DECISIONS_SQL = ", ".join(f"'{decision}'" for decision in CLOSE_DECISIONS)  # constants, no input


@dataclass(frozen=True)
class ClosePricing:
    """The price of a meter at close when a plan prices it (as real-time rating resolves it)."""

    spec: Any
    included: Decimal
    trialing: bool
    price: dict[str, Any]  # the spec as JSON, the decision's input
    # The prices before the period's plan changes, oldest first (``CloseLine.earlier_prices``), and what prices the
    # period from its last change on (a plan, or the meter's list price when no plan charges it then).
    earlier: tuple[dict[str, Any], ...] = ()
    priced_by: str = "plan"


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
    # Added with subscription closes; lines stored before read back with these defaults.
    priced_by: str = "list_price"
    price: dict[str, Any] | None = None
    last_event_at: str | None = None
    # Added in session 15: the line's usage was the pricing subscription's trial usage (free), so late usage of the
    # period is too. Lines stored before read False.
    trial: bool = False
    # Added in session 15, a real-time meter's in a period with plan changes: what priced its usage before each change,
    # oldest first, ``{"until": the change's instant, "price", "included", "priced_by"}`` (the line's own price from
    # the last change on), so a late event or correction of the period is priced as real time priced usage of its time
    # (``billed_price_at``). None: one price for the whole period (and lines stored before).
    earlier_prices: list[dict[str, Any]] | None = None


async def close_period(db: Database, bus: Bus, catalog: CatalogView, period: str,
                       now: datetime | None = None) -> list[CloseLine]:
    """Closes ``period`` for every account that has rated usage in it; returns all its lines."""
    now = now or utcnow()
    rows = await db.fetch(
        "SELECT account_id, tenant, meter, group_key, event_id, event_time, quantity, value, amount_subunits, "
        "decision, corrects, effective_quantity, quantity_before, quantity_after, rated_at "
        f"FROM rated_events WHERE period = $1 AND decision IN "
        f"({_CLOSE_DECISIONS_SQL}) ORDER BY account_id, meter, group_key, event_time, rated_at", period)
    done = {(r["account_id"]) for r in await db.fetch(
        "SELECT account_id FROM closed_periods WHERE period = $1", period)}
    meters: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        meters.setdefault((row["account_id"], row["tenant"], row["meter"]), {}).setdefault(
            row["group_key"], []).append(row)
    commands: list[OutMessage] = []
    async with db.transaction() as conn:
        for (account, tenant, meter_code), groups in meters.items():
            if account in done:
                continue
            for line in _lines(catalog, period, tenant, meter_code, groups, None):
                await _save_line(conn, account, line, now)
                command = close_command(catalog, account, line)
                if command is not None:
                    commands.append(command)
        for account in {key[0] for key in meters} - done:
            await conn.execute("INSERT INTO closed_periods (period, account_id, closed_at) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", period, account, now.isoformat())
    await bus.publish(commands)
    return await lines_of(db, period)


async def close_account_period(conn: Connection, catalog: CatalogView, period: str, account: str, tenant: str,
                               pricing: Callable[[MeterView], ClosePricing | None],
                               now: datetime | None = None) -> list[CloseLine]:
    """Closes one account's ``period`` (a subscription's) inside the caller's transaction; returns its lines.

    ``pricing`` gives a meter's plan price (``None``: the list price applies). Once closed, the period is
    closed for good: a second call (a redelivered ``PeriodEnded``) reads the stored lines back, and events
    of the period that arrive later follow their meter's late policy. The caller publishes the commands of
    the lines (:func:`close_command`): the same command ids every time, so the ledger posts each once.
    """
    if await conn.fetchrow("SELECT 1 FROM closed_periods WHERE period = $1 AND account_id = $2", period, account):
        rows = await conn.fetch("SELECT line FROM close_lines WHERE period = $1 AND account_id = $2 "
                                "ORDER BY meter, group_key", period, account)
        return [CloseLine(**json.loads(r["line"])) for r in rows]
    now = now or utcnow()
    rows = await conn.fetch(
        f"SELECT {_COUNTED_COLUMNS} FROM rated_events WHERE period = $1 "
        f"AND account_id = $2 AND decision IN ({_CLOSE_DECISIONS_SQL}) ORDER BY meter, group_key, event_time, rated_at", period, account)
    meters: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        meters.setdefault(row["meter"], {}).setdefault(row["group_key"], []).append(dict(row))
    lines = []
    for meter_code, groups in sorted(meters.items()):
        meter = catalog.meters.get(meter_code)
        if meter is None or meter.error:
            continue  # its events were refused (no_price), none is in ``groups``
        for line in _lines(catalog, period, tenant, meter_code, groups, pricing(meter)):
            await _save_line(conn, account, line, now)
            lines.append(line)
    await conn.execute("INSERT INTO closed_periods (period, account_id, closed_at) VALUES ($1, $2, $3) "
                       "ON CONFLICT DO NOTHING", period, account, now.isoformat())
    return lines


# The columns of the decisions a close counts (``_lines``, ``counted_decisions``).
_COUNTED_COLUMNS = ("meter, group_key, event_id, event_time, quantity, value, amount_subunits, decision, corrects, "
                    "effective_quantity, quantity_before, quantity_after, rated_at")


async def counted_decisions(conn: Connection, account: str, period: str, meter: str) -> dict[str, list[dict[str, Any]]]:
    """The decisions of ``meter`` in ``account``'s ``period`` that its close counts (those the close counted, and the
    late ones since), by ``group_by`` group: what :func:`meter_quantity` aggregates."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in await conn.fetch(
            f"SELECT {_COUNTED_COLUMNS} FROM rated_events WHERE period = $1 AND account_id = $2 AND meter = $3 AND "
            f"decision IN ({_CLOSE_DECISIONS_SQL}) ORDER BY group_key, event_time, rated_at", period, account, meter):
        groups.setdefault(row["group_key"], []).append(dict(row))
    return groups


def meter_quantity(meter: MeterView, groups: dict[str, list[dict[str, Any]]]) -> Decimal:
    """The quantity a close counts for a meter priced at close (max, last, unique_count) from its decisions
    ``groups`` (:func:`counted_decisions`): each group aggregated by the meter's rule, its latest corrections counting,
    summed (as :func:`_lines` prices it)."""
    latest, shifts = _moves(meter, groups)
    total = Decimal(0)
    for group, rows in groups.items():
        total = RATING_CONTEXT.add(total, _counted(meter, rows, latest)[2])
        total = RATING_CONTEXT.add(total, shifts.get(group, Decimal(0)))
    return total


async def _save_line(conn: Connection, account: str, line: CloseLine, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO close_lines (period, account_id, tenant, meter, group_key, line, closed_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        line.period, account, line.tenant, line.meter, line.group, json.dumps(asdict(line)), now.isoformat())


async def lines_of(db: Database, period: str, tenant: str | None = None) -> list[CloseLine]:
    if tenant is None:
        rows = await db.fetch("SELECT line FROM close_lines WHERE period = $1 ORDER BY tenant, meter, group_key",
                              period)
    else:
        rows = await db.fetch("SELECT line FROM close_lines WHERE period = $1 AND tenant = $2 "
                              "ORDER BY meter, group_key", period, tenant)
    return [CloseLine(**json.loads(r["line"])) for r in rows]


def _lines(catalog: CatalogView, period: str, tenant: str, meter_code: str,
           groups: dict[str, list[dict[str, Any]]], pricing: ClosePricing | None) -> list[CloseLine]:
    """The lines of one meter, one per ``group_by`` group (sorted by group key).

    The meter's quantity is the sum of its groups' (each aggregated by the meter's rule) and is priced once: the
    allowance and the tiers apply once per meter and period, as in real time. Each group's line takes its part of
    that price in group order, ``period_charge(groups up to it) - period_charge(groups before it)``, so the lines
    add up to the meter's price exactly (a close-priced meter posts each line's part, command id per group).
    """
    meter = catalog.meters[meter_code]
    definition = meter.definition
    spec = pricing.spec if pricing is not None else meter.spec
    included = pricing.included if pricing is not None else definition.included
    unit = spec.unit if spec else (meter.ai_table.unit if meter.ai_table else None)
    # Usage while the pricing subscription is trialing is recorded, not charged (as in real time).
    trialing = pricing is not None and pricing.trialing
    before = Decimal(0)  # the quantity of the groups before this one
    charged_before = 0  # period_charge of it
    lines = []
    latest, shifts = _moves(meter, groups)
    for group, rows in sorted(groups.items()):
        items, observations, quantity = _counted(meter, rows, latest)
        events = repricing.traced(items)  # the raw events the line counts (a repricing's decisions are not ones)
        quantity = RATING_CONTEXT.add(quantity, shifts.get(group, Decimal(0)))
        real_time = sum(int(r["amount_subunits"]) for r in items)
        if meter.ai_table is not None or spec is not None and is_per_event(spec):
            # Linear per-token prices, or fees per transaction (percentage): the real-time increments are the
            # period's price, never a price of its total.
            total = 0 if trialing else real_time
            billable = quantity if meter.ai_table is not None else max(Decimal(0), quantity - included)
        else:
            assert spec is not None
            after = RATING_CONTEXT.add(before, quantity)
            charged_after = period_charge(spec, after, included)
            total = 0 if trialing else charged_after - charged_before
            billable = max(Decimal(0), after - included) - max(Decimal(0), before - included)
            before, charged_before = after, charged_after
        at_close = 0 if definition.aggregation in REAL_TIME else total
        lines.append(CloseLine(
            period=period, tenant=tenant, meter=meter_code, group=group, aggregation=definition.aggregation,
            quantity=decimal_text(quantity), included=decimal_text(included), billable=decimal_text(billable),
            unit=unit, amount_subunits=total, amount=subunits_text(total), charged_in_real_time_subunits=real_time,
            charged_at_close_subunits=at_close, event_count=len(events),
            event_ids=[event for event, _ in events[:TRACE_EVENT_IDS_MAX]], catalog_version=catalog.version,
            priced_by=pricing.priced_by if pricing is not None else "list_price",
            price=pricing.price if pricing is not None else definition.price,
            last_event_at=max(o.at for o in observations).isoformat() if observations else None, trial=trialing,
            earlier_prices=list(pricing.earlier) if pricing is not None and pricing.earlier and (
                definition.aggregation in REAL_TIME and meter.ai_table is None) else None,
        ))
    return lines


def billed_price_at(line: dict[str, Any], moment: datetime) -> tuple[dict[str, Any], Decimal, str, datetime | None]:
    """(price, allowance, priced by, the latest plan change of the period at or before ``moment`` or None) with which
    the close ``line`` (stored JSON) says usage at ``moment`` of its period was priced: the price before a change of
    ``earlier_prices`` until it, the line's own from the last change on."""
    change = None
    for earlier in line.get("earlier_prices") or ():
        until = datetime.fromisoformat(earlier["until"])
        if moment < until:
            return earlier["price"], Decimal(earlier["included"]), earlier.get("priced_by", "plan"), change
        change = until
    return line["price"], Decimal(line["included"]), line.get("priced_by", "list_price"), change


def _moves(meter: MeterView, groups: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, str], dict[str, Decimal]]:
    """(corrected event id -> the id of its latest correction, group -> what corrections moved into it from other
    groups) of one meter's decisions, over all its groups.

    A correction counts in its own group (its properties'), which may not be its original's: the latest correction
    of an event is the one that counts for a meter priced at close, in whichever group (the original's group no
    longer counts the event). A real-time correction's decision moved the meter's total by the difference (``new -
    old``); moved out of the group of the version it amends, that group gives up the old quantity and its own
    counts the new one: the correction's group gets ``new - difference`` more, the other as much less.
    """
    versions: dict[str, list[dict[str, Any]]] = {}
    for rows in groups.values():
        for r in rows:
            versions.setdefault(r["corrects"] or r["event_id"], []).append(r)
    latest: dict[str, str] = {}
    shifts: dict[str, Decimal] = {}
    real_time = meter.definition.aggregation in REAL_TIME and meter.ai_table is None
    for event_id, chain in versions.items():
        if len(chain) == 1 and not chain[0]["corrects"]:
            continue  # never corrected (most events)
        # The original first, then its corrections in the order they were rated (they share its time).
        chain.sort(key=lambda r: (r["corrects"] is not None, r["rated_at"]))
        if chain[-1]["corrects"]:
            latest[event_id] = chain[-1]["event_id"]
        if not real_time:
            continue
        for amended, r in pairwise(chain):
            if r["group_key"] == amended["group_key"]:
                continue
            new = Decimal(r["effective_quantity"])
            gained = contribution(meter.definition, new) if new else Decimal(0)
            shift = RATING_CONTEXT.subtract(gained, RATING_CONTEXT.subtract(Decimal(r["quantity_after"]),
                                                                            Decimal(r["quantity_before"])))
            shifts[r["group_key"]] = RATING_CONTEXT.add(shifts.get(r["group_key"], Decimal(0)), shift)
            shifts[amended["group_key"]] = RATING_CONTEXT.subtract(shifts.get(amended["group_key"], Decimal(0)),
                                                                   shift)
    return latest, shifts


def _counted(meter: MeterView, items: list[dict[str, Any]], latest: dict[str, str]
             ) -> tuple[list[dict[str, Any]], list[Observation], Decimal]:
    """(the decisions that count, their observations, the quantity) of one group of a meter; ``latest``: each
    corrected event's latest correction, over all the meter's groups (:func:`_moves`)."""
    definition = meter.definition
    if definition.aggregation not in REAL_TIME:
        # A corrected event counts with its latest corrected value (corrections of one event share its time and
        # come in the order they were rated), in the latest correction's group; real-time meters carry deltas
        # instead. A correction to 0 voids the event: it no longer counts, even as a ``last`` reading (the reading
        # before it is the last one then), while an event sent with quantity 0 is a reading of 0 for ``last``
        # (nothing for the other rules).
        counting = set(latest.values())
        amended = [{**r, "quantity": r["effective_quantity"]} for r in items
                   if r["corrects"] and r["event_id"] in counting and Decimal(r["effective_quantity"]) != 0]
        items = [r for r in items if not r["corrects"] and r["event_id"] not in latest] + amended
        items = [r for r in items if Decimal(r["quantity"]) != 0 or definition.aggregation == "last"]
    # An AI meter's quantity is its events' (its running totals count tokens): those it counts here, not the ones a
    # repricing moved to another period (their decisions and give-backs stay in ``items``, for the amounts).
    counted = items if meter.ai_table is None else [row for _, row in repricing.traced(items)]
    observations = [
        Observation(r["event_id"], datetime.fromisoformat(r["event_time"]), Decimal(r["quantity"]), r["value"])
        for r in counted
    ]
    if definition.aggregation in REAL_TIME and meter.ai_table is None:
        # What the decisions moved the running total by: a correction counts by its difference (500 amended to
        # 700 adds 200, a void takes its event back), a count meter one per event, as real time priced them.
        quantity = Decimal(0)
        for r in items:
            moved = RATING_CONTEXT.subtract(Decimal(r["quantity_after"]), Decimal(r["quantity_before"]))
            quantity = RATING_CONTEXT.add(quantity, moved)
    else:
        quantity = aggregate(definition, observations)
    return items, observations, quantity


def close_command_id(account: str, meter: str, group: str, period: str) -> UUID:
    """The id of the debit a close sends for one line: the same whenever the close is sent again."""
    return ids.command_id("usage.close", account, meter, group, period)


def sends_debit(line: CloseLine) -> bool:
    """Whether the close sends a debit for ``line``: only a close-priced meter's (max, last, unique_count) with a
    unit and a reading left (every event of a line can have been voided: nothing to record then)."""
    return line.aggregation not in REAL_TIME and bool(line.unit) and line.last_event_at is not None


def close_command(catalog: CatalogView, account: str, line: CloseLine, time_zone: str | None = None
                  ) -> OutMessage | None:
    """The ``usage.debit`` of what only the close prices (max, last, unique_count); ``None`` for a real-time meter
    (its events were debited as they came).

    Sent also when the line costs nothing (within the allowance, a trial): a debit of 0, which the ledger records
    with no postings, so the monthly usage summary shows the period's quantity (docs/rating.md "Usage that costs
    nothing"). Its id comes from (account, meter, group, period): built again from the stored line, it is the same
    command, which the ledger posts once.

    ``time_zone``: the zone of the subscription whose period closed, when not UTC (``cause.time_zone``, as real-time
    debits name it: the monthly summaries put the line in the month of its last event there).
    """
    if not sends_debit(line):
        return None
    meter = catalog.meters.get(line.meter)
    usage_type = (meter.definition.usage_type if meter else "") or line.meter
    message = LedgerCommand(
        command_id=close_command_id(account, line.meter, line.group, line.period), kind="usage.debit",
        tenant=line.tenant, issued_at=utcnow(), issued_by="service:rating",
        payload={"unit": line.unit, "amount_subunits": line.charged_at_close_subunits,
                 "amount": subunits_text(line.charged_at_close_subunits), "meter": line.meter,
                 "at": line.last_event_at, "overage_policy": "overage",  # the usage already happened: never refused
                 "cause": {"period": line.period, "aggregation": line.aggregation, "quantity": line.quantity,
                           "group": line.group, "event_ids": line.event_ids, "event_count": line.event_count,
                           "usage_type": usage_type, "catalog_version": line.catalog_version, "price": line.price,
                           "included": line.included, "priced_by": line.priced_by, "closed": True,
                           **({"time_zone": time_zone} if time_zone and time_zone != "UTC" else {})}})
    return OutMessage(topics.LEDGER_COMMANDS, account, message.to_json(), (("schema", b"ledger.command/v1"),))
