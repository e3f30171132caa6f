"""The cost of the revenue report (``GET /v1/reports/revenue``) on a store of ``--tenants`` tenants x ``--months``
months, on PostgreSQL.

The store is what a year of the read model holds (built in SQL, not replayed: the report reads nothing else): every
tenant has a ``revenue_daily`` row in USD every day (usage drawn from credit, overage; on the 1st its fee billed and
credit bought, each day a share of its fee recognised) and in CREDIT every 7th day (a plan's credit granted, used),
and its chart-of-accounts rows (``ledger_balances``). Each query is timed ``--repeat`` times, the API's whole route
(SQL, views, JSON or CSV) in process through its ASGI app, and the SQL alone (``revenue.period_rows``); the figures
are wall milliseconds (min / median) and the PostgreSQL backend's CPU per call.

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing .venv/bin/python tests/bench/bench_revenue_report.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from billing_projections import revenue
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.auth import mint_token
from billing_runtime.db import PostgresDatabase
from billing_runtime.eventloop import run_loop
from billing_runtime.http import create_app
from billing_runtime.settings import Settings

UNIT = "1000000000::bigint"  # a unit in sub-units, as a SQL literal (BIGINT: the sums pass int4)


async def fill(db: PostgresDatabase, tenants: int, first: date, days: int) -> dict[str, int]:
    """``revenue_daily`` and ``ledger_balances`` as a year of movements leaves them (see the module)."""
    last = first + timedelta(days=days - 1)
    await db.execute(f"""
        INSERT INTO revenue_daily (tenant, day, unit, credit_sold, fees_billed, recognised_usage, recognised_fees,
                                   revenue_usage, revenue_fees, last_position)
        SELECT 'tenant-' || lpad(t::text, 5, '0'), to_char(d, 'YYYY-MM-DD'), 'USD',
               CASE WHEN extract(day FROM d) = 1 THEN 100 * {UNIT} ELSE 0 END,
               CASE WHEN extract(day FROM d) = 1 THEN 31 * {UNIT} ELSE 0 END,
               (t % 97 + 1) * {UNIT} / 10, {UNIT}, (t % 97 + 1) * {UNIT} / 10 + (t % 5) * {UNIT} / 100, {UNIT},
               t * 1000 + (d::date - DATE '{first}')
        FROM generate_series(1, {tenants}) t, generate_series(DATE '{first}', DATE '{last}', interval '1 day') d""")
    await db.execute(f"""
        INSERT INTO revenue_daily (tenant, day, unit, plan_grants, recognised_usage, revenue_usage, last_position)
        SELECT 'tenant-' || lpad(t::text, 5, '0'), to_char(d, 'YYYY-MM-DD'), 'CREDIT', 700 * {UNIT}, 90 * {UNIT},
               90 * {UNIT}, t * 1000 + (d::date - DATE '{first}')
        FROM generate_series(1, {tenants}) t, generate_series(DATE '{first}', DATE '{last}', interval '7 days') d""")
    await db.execute("""
        INSERT INTO ledger_balances (tenant, ledger_account, unit, amount, last_position)
        SELECT r.tenant, a.account, r.unit, -SUM(CASE WHEN a.account = 'tenant_wallet'
                                                     THEN r.credit_sold + r.plan_grants - r.recognised_usage
                                                     ELSE r.fees_billed - r.recognised_fees END), 1
        FROM revenue_daily r, (VALUES ('tenant_wallet'), ('deferred_revenue')) a(account)
        GROUP BY r.tenant, a.account, r.unit""")
    await db.execute("ANALYZE revenue_daily")
    await db.execute("ANALYZE ledger_balances")
    return {"revenue_daily_rows": int(await db.fetchval("SELECT COUNT(*) FROM revenue_daily")),
            "ledger_balances_rows": int(await db.fetchval("SELECT COUNT(*) FROM ledger_balances"))}


async def timed(call: Callable[[], Awaitable[Any]], repeat: int, backend: psutil.Process) -> dict[str, float]:
    await call()  # warm: plans cached, pages in shared buffers
    walls, cpu = [], sum(backend.cpu_times()[:2])
    for _ in range(repeat):
        began = time.perf_counter()
        await call()
        walls.append(time.perf_counter() - began)
    cpu = sum(backend.cpu_times()[:2]) - cpu
    return {"min_ms": round(min(walls) * 1000, 1), "median_ms": round(statistics.median(walls) * 1000, 1),
            "postgres_cpu_ms_per_call": round(cpu / repeat * 1000, 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL (see `make stack-up`)")
    schema = "benchrevenue" + uuid.uuid4().hex[:8]
    db = await PostgresDatabase(url, schema, pool_size_max=1, pool_size_min=1).connect()
    try:
        await ProjectionService(db).setup()
        first = date(2025, 12, 1)
        end = date(first.year + (first.month - 1 + args.months) // 12, (first.month - 1 + args.months) % 12 + 1, 1)
        store = await fill(db, args.tenants, first, (end - first).days)
        backend = psutil.Process(await db.fetchval("SELECT pg_backend_pid()"))
        settings = Settings()
        app = create_app("projections", settings)
        for router in build_routers(db):
            app.include_router(router)
        headers = {"Authorization": f"Bearer {mint_token(settings, role='finance')}"}
        last_month = (end - timedelta(days=1)).strftime("%Y-%m")
        first_month = first.strftime("%Y-%m")
        results: dict[str, Any] = {"tenants": args.tenants, "months": args.months, **store}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            async def route(**params: str) -> None:
                r = await client.get("/v1/reports/revenue", params=params, headers=headers)
                assert r.status_code == 200, r.text

            for name, params in (
                    (f"period={last_month} (latest month)", {"period": last_month}),
                    (f"period={first_month} (12 months back)", {"period": first_month}),
                    (f"period={last_month}&by=tenant", {"period": last_month, "by": "tenant"}),
                    (f"period={last_month}&by=tenant&format=csv", {"period": last_month, "by": "tenant",
                                                                   "format": "csv"}),
                    (f"at={last_month}-15", {"at": f"{last_month}-15"})):
                results[f"route {name}"] = await timed(lambda p=params: route(**p), args.repeat, backend)  # type: ignore[misc]
            start, stop = f"{last_month}-01", end.isoformat()
            results["sql latest month"] = await timed(
                lambda: revenue.period_rows(db, start_day=start, end_day=stop), args.repeat, backend)
            results["sql latest month, one tenant"] = await timed(
                lambda: revenue.period_rows(db, start_day=start, end_day=stop, tenant="tenant-00500"), args.repeat,
                backend)
            # What the report would cost summing the opening from every row before the period (it reads the chart of
            # accounts less what is dated from the period's end on instead).
            results["sql whole history (opening from the first day)"] = await timed(
                lambda: revenue.period_rows(db, start_day="1970-01-01", end_day=stop), args.repeat, backend)
        return results
    finally:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await db.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per query (after one to warm up)")
    print(json.dumps(run_loop(main(parser.parse_args())), indent=1))
