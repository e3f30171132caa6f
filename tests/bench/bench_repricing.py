"""What one repricing costs on a store with a year of decisions (real PostgreSQL).

    eval "$(bash deploy/local/stack.sh env)"
    flock /tmp/bench.lock .venv/bin/python tests/bench/bench_repricing.py [--accounts 5] [--months 12]

A subscription event that prices usage from an instant on (a ``Changed`` from its ``at``, ...) makes rating read
back the account's decisions it may have priced otherwise (``billing_rating.repricing``). This bench builds the
store rating has after a year: ``--accounts`` accounts, each subscribed for ``--months`` monthly periods of
``--events-per-month`` usage events (rated through ``RatingService.handle_accepted``, each period then ended by
the ledger's ``PeriodEnded``, so closed with its usage lines), in a fresh schema ``bench<hex>_billing_rating``
(dropped at the end). Then, ``--changes`` times, the first account gets ``--recent`` events in the last hour,
rated at the old plan, and a plan ``Changed`` whose ``at`` is before them: the figure is the time of
``handle_ledger_events`` of that one event (lock, apply, repricing of the recent events, publish), its median
and its range, with ``decisions_read``: the decisions the repricing's read can reach (the account's decisions
from its bound on), a year's before session 14, those at or after the change's ``at`` since.

The bench drives rating's handlers in this process (no Kafka: the bus keeps what is published); only its code and
PostgreSQL's are measured. Compare old and new code in pairs run back to back (``git archive`` the old commit,
``PYTHONPATH`` over it), at similar ``host speed``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.service import RatingService
from billing_runtime.bus import Record
from billing_runtime.db import PostgresDatabase
from billing_runtime.logging import configure_logging

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `tests.` importable
    sys.path.insert(0, str(ROOT))

from tests.bench.harness.resources import host_speed_ms
from tests.support import drop_schema

PER_UNIT = {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "aggregation": "sum", "price": PER_UNIT},
               {"code": "seats", "aggregation": "last", "price": {**PER_UNIT, "unit_amount": "5"}}],
    "plans": [
        {"code": "pro", "name": "Pro", "currency": "USD", "version": 1, "charges": [
            {"meter": "api_calls", "included": "1000", "price": {**PER_UNIT, "unit_amount": "0.008"}}]},
        {"code": "scale", "name": "Scale", "currency": "USD", "version": 1, "charges": [
            {"meter": "api_calls", "included": "5000", "price": {**PER_UNIT, "unit_amount": "0.005"}}]},
    ]}
PERIOD = timedelta(days=30)
BATCH_EVENTS_MAX = 2_000  # a Kafka poll's records (Settings.batch_records_max)


class _Outbox:
    """Keeps what rating publishes (no Kafka: only rating and PostgreSQL are measured)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def publish(self, messages: Any) -> None:
        self.messages.extend(messages)


def _usage(tenant: str, event_id: str, at: datetime, meter: str = "api_calls") -> Record:
    event = UsageEvent(id=event_id, tenant=tenant, meter=meter, quantity="3", timestamp=at)
    message = AcceptedUsage(account_id=ids.account_id(tenant), event=event, accepted_at=at, source="bench",
                            catalog_version=1)
    return Record(topics.USAGE_ACCEPTED, 0, 0, None, message.to_json())


def _ledger_event(aggregate: uuid.UUID, position: int, kind: str, **data: Any) -> Record:
    event = LedgerEvent(position=position, aggregate_id=aggregate, aggregate_version=position,
                        recorded_at=datetime.now(UTC), type=kind, data=data)
    return Record(topics.LEDGER_EVENTS, 0, position, None, event.to_json())


async def seed(service: RatingService, accounts: int, months: int, per_month: int, now: datetime
               ) -> tuple[list[uuid.UUID], datetime, datetime]:
    """A year of subscribed usage per account; returns the subscriptions and the current period's bounds."""
    await service.handle_ledger_events([_ledger_event(ids.catalog_id(), 2, "Catalog.Published",
                                                      version=1, document=CATALOG)])
    start = (now - PERIOD * months).replace(minute=0, second=0, microsecond=0)
    subscriptions = [uuid.UUID(int=index + 1) for index in range(accounts)]
    for index, subscription in enumerate(subscriptions):
        await service.handle_ledger_events([_ledger_event(
            subscription, 1, "Subscription.Started", tenant=f"acct{index}", plan={"code": "pro", "version": 1},
            quantity=1, status="active", started_at=start.isoformat(), period_start=start.isoformat(),
            period_end=(start + PERIOD).isoformat(), time_zone="UTC", anchor_day=start.day)])
    for month in range(months):
        begin = start + PERIOD * month
        step = PERIOD / per_month
        for index in range(accounts):
            tenant = f"acct{index}"
            records = [_usage(tenant, f"m{month}-e{n}", begin + step * n, "seats" if n % 50 == 0 else "api_calls")
                       for n in range(per_month)]
            for first in range(0, len(records), BATCH_EVENTS_MAX):
                await service.handle_accepted(records[first:first + BATCH_EVENTS_MAX])
        end = begin + PERIOD
        await service.handle_ledger_events([_ledger_event(
            subscription, 2 + month, "Subscription.PeriodEnded", period_start=begin.isoformat(),
            period_end=end.isoformat(), next_start=end.isoformat(), next_end=(end + PERIOD).isoformat())
            for subscription in subscriptions])
    return subscriptions, start + PERIOD * months, start + PERIOD * (months + 1)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--events-per-month", type=int, default=5_000)
    parser.add_argument("--changes", type=int, default=7)
    parser.add_argument("--recent", type=int, default=20, help="events rated in the hour before each change")
    args = parser.parse_args()
    configure_logging(json_output=True, level=40)
    schema = f"bench{uuid.uuid4().hex[:8]}_billing_rating"
    database_url = os.environ["DATABASE_URL"]
    db = await PostgresDatabase(database_url, schema).connect()
    print(f"host speed {host_speed_ms():.0f} ms")
    try:
        outbox = _Outbox()
        service = RatingService(db, outbox)  # type: ignore[arg-type]
        await service.setup()
        now = datetime.now(UTC) - timedelta(days=1)
        seeded = time.monotonic()
        subscriptions, period_start, period_end = await seed(service, args.accounts, args.months,
                                                             args.events_per_month, now)
        await db.execute("ANALYZE rated_events")
        rows = await db.fetchval("SELECT count(*) FROM rated_events")
        print(f"store: {rows} decisions, {args.accounts} accounts x {args.months} periods "
              f"({time.monotonic() - seeded:.0f} s to seed)")
        account = str(ids.account_id("acct0"))
        timings, reached, sent = [], [], []
        plans = [{"code": "pro", "version": 1}, {"code": "scale", "version": 1}]
        version = 2 + args.months
        for change in range(args.changes):
            at = period_start + timedelta(hours=1 + change * 2)
            await service.handle_accepted([_usage("acct0", f"recent{change}-{n}", at + timedelta(seconds=n + 1))
                                           for n in range(args.recent)])
            old, new = plans[change % 2], plans[(change + 1) % 2]
            record = _ledger_event(subscriptions[0], version + change, "Subscription.Changed", old_plan=old,
                                   plan=new, old_quantity=1, quantity=1, at=at.isoformat(), by="user:bench",
                                   lines=[], period_start=period_start.isoformat(),
                                   period_end=period_end.isoformat(), anchor_day=period_start.day)
            outbox.messages.clear()
            started = time.perf_counter()
            await service.handle_ledger_events([record])
            timings.append((time.perf_counter() - started) * 1000)
            sent.append(len(outbox.messages))
            reached.append((await db.fetchval(
                "SELECT count(*) FROM rated_events WHERE account_id = $1 AND event_time >= $2", account,
                at.isoformat()), await db.fetchval(
                "SELECT count(*) FROM rated_events WHERE account_id = $1 AND period >= $2", account,
                (at - timedelta(days=367)).strftime("%Y-%m"))))
        print(f"repricing ms: median {statistics.median(timings):.1f}, min {min(timings):.1f}, "
              f"max {max(timings):.1f} ({args.changes} plan changes; commands sent by each: {sent})")
        print(f"decisions at or after the change's at: {reached[-1][0]}; "
              f"of periods up to a year back: {reached[-1][1]}")
        print(f"host speed {host_speed_ms():.0f} ms")
    finally:
        await db.close()
        await drop_schema(database_url, schema)


if __name__ == "__main__":
    asyncio.run(main())
