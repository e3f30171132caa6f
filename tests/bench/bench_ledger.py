"""Ledger speed on real PostgreSQL (a plain script; pytest does not collect it).

    DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_ledger.py [--debits 50000] [--batch 500] [--holds 2000]

1. **Usage debits/s**: ``usage.debit`` commands committed in transactions of ``--batch`` commands (each
   with its Kafka ``Tracking`` position), spread over ``--tenants`` accounts: first one
   ``LedgerApplication.apply_commands`` call per transaction, then ``apply_chunks``, which prepares the
   next transaction while the previous one commits (what the Kafka consumer uses). Decoding the JSON
   records (``LedgerCommand.model_validate_json``) is measured separately. Target: >= 10,000 debits/s.
2. **Hold decisions**: ``POST /v1/accounts/{tenant}/holds`` through the real HTTP stack (uvicorn on a free
   port, httpx client) at a fixed offered rate (``--hold-rate``, default 200/s), each hold a one-command
   transaction; latency measured at the client. Target: p99 < 5 ms. Then the same while a thread keeps
   committing usage batches (contention on the event table lock).

Everything runs in a fresh schema ``bench_<random>_billing_ledger``, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import threading
import time
import uuid
from datetime import UTC, datetime

import psycopg
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from eventsourcing.persistence import IntegrityError, Tracking

GRANT_UNITS = "1000000000"  # USD per tenant: never runs out during the bench


def command(kind: str, tenant: str, payload: dict[str, object], cause: str) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant, cause), kind=kind, tenant=tenant,
                         issued_at=datetime.now(UTC), issued_by="bench", payload=payload)


def setup_accounts(app: LedgerApplication, tenants: list[str]) -> None:
    commands: list[LedgerCommand] = []
    for tenant in tenants:
        commands.append(command("account.open", tenant, {"currency": "USD"}, "open"))
        commands.append(command("credit.grant", tenant, {"grant_key": "bench", "unit": "USD",
                                                         "amount": GRANT_UNITS, "source": "promotion"}, "grant"))
    for start in range(0, len(commands), 500):
        app.apply_commands(commands[start:start + 500])


def debit_records(tenants: list[str], count: int, run: str) -> list[bytes]:
    now = datetime.now(UTC).isoformat()
    return [
        command("usage.debit", tenants[i % len(tenants)],
                {"unit": "USD", "amount_subunits": 2_000 + i % 7, "meter": "tokens", "at": now,
                 "cause": {"event_id": f"{run}-{i}"}}, f"{run}-{i}").to_json()
        for i in range(count)
    ]


def bench_debits(app: LedgerApplication, tenants: list[str], debits: int, batch: int, pipelined: bool,
                 partition: int) -> dict[str, float]:
    records = debit_records(tenants, debits, uuid.uuid4().hex[:8])
    started = time.perf_counter()
    commands = [LedgerCommand.model_validate_json(r) for r in records]
    decode_seconds = time.perf_counter() - started
    name = f"kafka:bench:{partition}"
    # Warm-up batch (connections, prepared statements, cache), not timed.
    app.apply_commands(commands[:batch], Tracking(name, batch))
    chunks = [(commands[start:start + batch], Tracking(name, start + len(commands[start:start + batch])))
              for start in range(batch, len(commands), batch)]
    started = time.perf_counter()
    if pipelined:
        results = app.apply_chunks(chunks)
    else:
        results = [r for chunk, tracking in chunks for r in app.apply_commands(chunk, tracking)]
    seconds = time.perf_counter() - started
    assert len(results) == len(commands) - batch and all(r.outcome == "applied" for r in results), results[:3]
    return {"debits_per_second": (len(commands) - batch) / seconds,
            "decode_per_second": len(records) / decode_seconds}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_holds(app: LedgerApplication, tenants: list[str], holds: int, rate: float) -> dict[str, float]:
    import httpx
    import uvicorn
    from billing_ledger.http import build_router
    from billing_runtime.auth import mint_token
    from billing_runtime.http import create_app
    from billing_runtime.settings import Settings


    settings = Settings()
    api = create_app("bench", settings)
    api.include_router(build_router(app))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    token = mint_token(settings, role="service")
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        run = uuid.uuid4().hex[:8]

        async def one(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            body = {"idempotency_key": f"{run}-{i}", "amount": "0.01", "ttl_seconds": 60}
            started = time.perf_counter()
            response = await client.post(f"/v1/accounts/{tenant}/holds", json=body)
            latencies.append(time.perf_counter() - started)
            assert response.status_code == 201, response.text

        for i in range(20):  # warm-up
            await one(i)
        latencies.clear()
        tasks = []
        interval = 1.0 / rate
        began = time.perf_counter()
        for i in range(20, 20 + holds):
            # Open-loop arrivals at a fixed rate: a slow answer does not slow the offered load down.
            delay = began + (i - 20) * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    server.should_exit = True
    await serving
    return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "max_ms": 1000 * max(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--debits", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--holds", type=int, default=2_000)
    parser.add_argument("--hold-rate", type=float, default=200.0)
    args = parser.parse_args()
    database_url = os.environ.get("DATABASE_URL", "postgresql://billing:billing@127.0.0.1:55432/billing")
    schema = f"bench_{uuid.uuid4().hex[:8]}_billing_ledger"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    app = LedgerApplication(persistence_env(database_url, "var", schema))
    try:
        tenants = [f"bench-{i}" for i in range(args.tenants)]
        setup_accounts(app, tenants)
        for pipelined, partition in ((False, 0), (True, 1)):
            debits = bench_debits(app, tenants, args.debits, args.batch, pipelined, partition)
            how = "apply_chunks (pipelined)" if pipelined else "apply_commands"
            print(f"usage debits via {how}: {debits['debits_per_second']:,.0f}/s committed "
                  f"(transactions of {args.batch}, {args.tenants} accounts); "
                  f"decoding {debits['decode_per_second']:,.0f} records/s")
        if args.holds:
            quiet = asyncio.run(bench_holds(app, tenants, args.holds, args.hold_rate))
            print(f"holds at {args.hold_rate:.0f}/s: p50 {quiet['p50_ms']:.2f} ms, p99 {quiet['p99_ms']:.2f} ms, "
                  f"max {quiet['max_ms']:.2f} ms")
            stop = threading.Event()

            def usage_load() -> None:
                offset = 10**9
                while not stop.is_set():
                    chunk = [LedgerCommand.model_validate_json(r)
                             for r in debit_records(tenants, args.batch, uuid.uuid4().hex[:8])]
                    offset += len(chunk)
                    for _ in range(50):  # a hold on one of the batch's accounts won the race: retry, like the bus
                        try:
                            app.apply_commands(chunk, Tracking("kafka:bench:2", offset))
                            break
                        except IntegrityError:
                            time.sleep(0.01)
                    time.sleep(0.05)  # ~ a few thousand debits/s alongside the holds

            loader = threading.Thread(target=usage_load, daemon=True)
            loader.start()
            try:
                busy = asyncio.run(bench_holds(app, tenants, args.holds, args.hold_rate))
            finally:
                stop.set()
                loader.join()
            print(f"holds at {args.hold_rate:.0f}/s with usage batches committing alongside: "
                  f"p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms, max {busy['max_ms']:.2f} ms")
    finally:
        app.close()
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
