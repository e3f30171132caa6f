"""Closing the billing period of N subscriptions on PostgreSQL (issue: 10,000 in under 60 s).

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \
        .venv/bin/python tests/bench/bench_cycle.py --subscriptions 10000

Setup (not timed): a catalogue with a plan (base fee, metered charge, recurring credits), N accounts each
with one active subscription. Timed: the scheduler finds the N due subscriptions, every one is renewed
(period closed, recurring credits voided and re-issued, renewal draft invoice), then rating's usage lines
land and each invoice is finalized with its gap-free number -- all through LedgerApplication.apply_commands
in batches, as the Kafka consumer does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.scheduler import DueIndex

BATCH_COMMANDS_MAX = 500
START = datetime(2026, 10, 1, tzinfo=UTC)
CATALOG = {
    "credit_units": {"CREDIT": {"scale": 2}},
    "meters": [{"code": "api_calls", "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.01"}}],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00",
               "charges": [{"meter": "api_calls", "included": "1000",
                            "price": {"model": "per_unit", "unit": "USD", "unit_amount": "0.002"}}],
               "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]}],
}


def command(kind: str, tenant: str | None, at: datetime, **payload: object) -> LedgerCommand:
    return LedgerCommand(command_id=uuid.uuid4(), kind=kind, tenant=tenant, issued_at=at, issued_by="bench",
                         payload={"at": at.isoformat(), **payload})


def apply(app: LedgerApplication, commands: list[LedgerCommand]) -> None:
    for i in range(0, len(commands), BATCH_COMMANDS_MAX):
        results = app.apply_commands(commands[i:i + BATCH_COMMANDS_MAX])
        bad = [r for r in results if r.outcome != "applied"]
        assert not bad, bad[:3]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subscriptions", type=int, default=10_000)
    args = parser.parse_args()
    schema = "bench_cycle_" + uuid.uuid4().hex[:8]
    import asyncio

    import asyncpg

    async def create_schema() -> None:
        conn = await asyncpg.connect(os.environ["DATABASE_URL"])
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.close()

    asyncio.run(create_schema())
    app = LedgerApplication(persistence_env(os.environ["DATABASE_URL"], "var", schema))
    tenants = [f"t{i}" for i in range(args.subscriptions)]
    setup = time.perf_counter()
    apply(app, [command("catalog.publish", None, START, document=CATALOG, digest="c")])
    apply(app, [command("account.open", t, START, currency="USD") for t in tenants])
    apply(app, [command("subscription.create", t, START, key="main", plan="team", trial=False) for t in tenants])
    setup_s = time.perf_counter() - setup

    period_end = datetime(2026, 11, 1, tzinfo=UTC)
    started = time.perf_counter()
    index = DueIndex()
    index.catch_up(app)
    ticks = index.ticks(period_end + timedelta(seconds=1))
    assert len(ticks) == args.subscriptions, len(ticks)
    apply(app, ticks)
    apply(app, [command("invoice.usage_lines", t, period_end, invoice_key=f"{subscription_id(t, 'main')}/"
                        f"{period_end.isoformat()}", lines=[{"kind": "usage", "description": "API calls",
                                                             "amount": "4.00", "meter": "api_calls"}])
                for t in tenants])
    elapsed = time.perf_counter() - started
    print(json.dumps({"bench": "cycle_close", "subscriptions": args.subscriptions, "setup_seconds": round(setup_s, 1),
                      "close_seconds": round(elapsed, 1),
                      "subscriptions_per_second": round(args.subscriptions / elapsed)}))


if __name__ == "__main__":
    main()
