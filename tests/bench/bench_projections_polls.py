"""The projections consumer's live path without Kafka: polls of ``--poll`` usage debits (each a different tenant, as
the flow of ``bench_projections.py``) through ``ProjectionService.handle_partitions`` on PostgreSQL, one connection.

Prints one JSON line: the Python CPU (this process) and the PostgreSQL CPU (its one backend, nothing else of the
machine) per event, and the wall time per poll; ``--statements`` adds each statement's mean time per poll. On a
shared machine compare versions by running them alternately (``PYTHONPATH`` pointing at the other version's
``billing_projections``): the full bench's per-event figures include Kafka, the API's reads and every other
PostgreSQL process, and spread more.

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing .venv/bin/python tests/bench/bench_projections_polls.py
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from billing_events import topics
from billing_projections.service import ProjectionService
from billing_projections.tuning import tune_gc
from billing_runtime.bus import OutMessage, Record
from billing_runtime.db import PostgresDatabase
from billing_runtime.eventloop import run_loop

from tests.bench.bench_projections import T0, Stream, kafka_partition

PARTITIONS = 16
WARM_UP_POLLS = 20


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL (see `make stack-up`)")
    schema = "benchpolls" + uuid.uuid4().hex[:8]
    db = await PostgresDatabase(url, schema, pool_size_max=1, pool_size_min=1).connect()
    service = ProjectionService(db)
    offsets = [0] * PARTITIONS
    partition_of: dict[str, int] = {}

    def polled(messages: list[OutMessage]) -> list[list[Record]]:
        batches: dict[int, list[Record]] = {}
        for m in messages:
            part = partition_of.get(m.key)
            if part is None:
                part = partition_of[m.key] = kafka_partition(m.key, PARTITIONS)
            batches.setdefault(part, []).append(
                Record(topics.LEDGER_EVENTS, part, offsets[part], m.key.encode(), m.value, m.headers))
            offsets[part] += 1
        return list(batches.values())

    try:
        await service.setup()
        backend = psutil.Process(await db.fetchval("SELECT pg_backend_pid()"))
        stream = Stream()
        tenants = [f"bench-{i:05d}" for i in range(args.tenants)]
        history = [m for t in tenants for m in stream.opened(t)]
        for n in range(args.history):  # the tables as a rebuild leaves them: rows for every tenant already
            history += [stream.fast_debit(t, n * len(tenants) + i, T0 + timedelta(seconds=n))
                        for i, t in enumerate(tenants)]
        await service.handle_partitions(polled(history))
        polls, n = [], 0
        for _ in range(WARM_UP_POLLS + args.polls):
            batch = []
            for _ in range(args.poll):
                n += 1
                batch.append(stream.fast_debit(tenants[n % len(tenants)], 10**7 + n,
                                               T0 + timedelta(days=20, seconds=n % 86400)))
            polls.append(polled(batch))
        for batches in polls[:WARM_UP_POLLS]:
            await service.handle_partitions(batches)
        timed = _time_statements() if args.statements else None
        cpu, pg, wall = time.process_time(), sum(backend.cpu_times()[:2]), time.perf_counter()
        for batches in polls[WARM_UP_POLLS:]:
            await service.handle_partitions(batches)
        cpu, pg, wall = time.process_time() - cpu, sum(backend.cpu_times()[:2]) - pg, time.perf_counter() - wall
        events = args.polls * args.poll
        result: dict[str, Any] = {
            "polls": args.polls, "events_per_poll": args.poll, "python_cpu_us_per_event": round(cpu / events * 1e6, 1),
            "postgres_backend_cpu_us_per_event": round(pg / events * 1e6, 1),
            "wall_ms_per_poll": round(wall / args.polls * 1000, 2)}
        if timed is not None:
            result["statement_ms_per_poll"] = {sql: round(seconds / args.polls * 1000, 2)
                                               for sql, seconds in timed.most_common()}
        return result
    finally:
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await db.close()


def _time_statements() -> collections.Counter[str]:
    """Wall time of each statement the service sends from now on, by its first words (the backend's time and a
    round trip: the client waits)."""
    import asyncpg.connection
    from billing_runtime import db as runtime_db

    spent: collections.Counter[str] = collections.Counter()

    def timing(owner: Any, name: str, label: Any) -> None:
        original = getattr(owner, name)

        async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await original(self, *args, **kwargs)
            finally:
                spent[label(args)] += time.perf_counter() - began

        setattr(owner, name, timed)

    for name in ("execute", "executemany", "fetch"):
        timing(runtime_db._PgConnection, name, lambda args: " ".join(str(args[0]).split()[:3]))
    timing(asyncpg.connection.Connection, "copy_records_to_table", lambda args: f"COPY {args[0]}")
    return spent


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poll", type=int, default=440, help="debits per poll (the full bench's polls at 5,000/s)")
    parser.add_argument("--polls", type=int, default=100, help="polls measured (after 20 to warm up)")
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--history", type=int, default=18, help="debits per tenant applied before")
    parser.add_argument("--statements", action="store_true", help="time each statement (adds a little CPU)")
    tune_gc()  # as the consumer process
    print(json.dumps(run_loop(main(parser.parse_args()))))
