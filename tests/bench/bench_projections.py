"""Projections benchmark on the real stack (Kafka + PostgreSQL): rebuild replay speed and balance reads.

1. Publishes ``--events`` ledger events (``--tenants`` accounts: opened, granted, then usage debits shaped
   exactly like the ledger relay's) to a fresh namespace's ``billing.ledger.events``.
2. ``billing projections rebuild`` (in process): drop + replay from offset 0 to the end; events/s.
3. Starts ``billing serve projections`` on the rebuilt schema and, while ``--flow`` usage events/s keep
   arriving, reads balances at ``--rps`` requests/s for ``--seconds``: p50/p99 latency, and the time from
   publishing a debit to seeing it in the balance (p99).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_projections.py --events 200000

Targets (issue 6): rebuild >= 50,000 events/s; balance read p99 < 5 ms at 200 req/s during 5,000 events/s;
event -> visible balance p99 < 1 s. Prints one JSON line; the namespace's schemas are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_projections.rebuild import rebuild
from billing_runtime.auth import mint_token
from billing_runtime.bus import KafkaBus, OutMessage
from billing_runtime.settings import Settings

from tests.support import ServiceProcess, free_port

U = 10**9
T0 = datetime(2026, 11, 1, tzinfo=UTC)


class Stream:
    """Relay-shaped ledger events with increasing positions (the ledger's notification ids)."""

    def __init__(self) -> None:
        self.position = 0
        self.versions: dict[str, int] = {}

    def event(self, tenant: str, name: str, data: dict[str, Any], at: datetime) -> OutMessage:
        self.position += 1
        aggregate = str(ids.account_id(tenant))
        version = self.versions[aggregate] = self.versions.get(aggregate, 0) + 1
        envelope = LedgerEvent(position=self.position, aggregate_id=aggregate, aggregate_version=version,
                               type=f"BillingAccount.{name}", tenant=tenant if name == "Opened" else None,
                               recorded_at=at, data=data)
        return OutMessage(topics.LEDGER_EVENTS, aggregate, envelope.to_json(), (("schema", b"ledger.event/v1"),))

    def opened(self, tenant: str) -> list[OutMessage]:
        grant = str(ids.grant_id(tenant, "bench"))
        return [
            self.event(tenant, "Opened", {"tenant": tenant, "currency": "USD", "low_balance_threshold": 10 * U,
                                          "opened_by": "bench"}, T0),
            self.event(tenant, "CreditGranted", {
                "grant_id": grant, "unit": "USD", "amount": 1_000_000 * U, "priority": 0,
                "effective_at": T0.isoformat(), "expires_at": None, "scope": None, "source": "promotion",
                "tax_amount": 0, "cause": {}, "granted_by": "bench",
                "postings": [{"account": "promotional_expense", "unit": "USD", "amount": 1_000_000 * U,
                              "grant_id": grant},
                             {"account": "tenant_wallet", "unit": "USD", "amount": -1_000_000 * U,
                              "grant_id": grant}]}, T0),
        ]

    def debit(self, tenant: str, n: int, at: datetime) -> OutMessage:
        grant = str(ids.grant_id(tenant, "bench"))
        amount = U // 5
        model = ("gpt-4o", "gpt-4o-mini")[n % 2]
        return self.event(tenant, "UsageDebited", {
            "command_id": str(ids.usage_command_id(tenant, f"e{n}")), "meter": "ai_tokens", "unit": "USD",
            "amount": amount, "overage": 0, "credit_grant": None, "at": at.isoformat(),
            "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": amount, "grant_id": grant},
                         {"account": "recognised_revenue", "unit": "USD", "amount": -amount, "grant_id": grant}],
            "draws": [{"grant_id": grant, "amount": amount}],
            "cause": {"event_ids": [f"e{n}"], "period": at.strftime("%Y-%m"), "quantity": "1200",
                      "usage_type": "ai", "model": model, "operation": "chat", "user": f"user-{n % 7}",
                      "tokens": {"input": "1000", "output": "200"},
                      "properties": {"model": model, "operation": "chat", "user": f"user-{n % 7}"}},
        }, at)


async def publish(settings: Settings, messages: list[OutMessage]) -> None:
    bus = KafkaBus(settings.kafka_bootstrap_servers or "", namespace=settings.namespace)
    await bus.start()
    try:
        for start in range(0, len(messages), 20_000):
            await bus.publish(messages[start:start + 20_000])
    finally:
        await bus.stop()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


async def reads_under_flow(settings: Settings, url: str, stream: Stream, tenants: list[str], rps: int, flow: int,
                           seconds: float) -> dict[str, float]:
    bus = KafkaBus(settings.kafka_bootstrap_servers or "", namespace=settings.namespace)
    await bus.start()
    latencies: list[float] = []
    visible: list[float] = []
    stop = time.monotonic() + seconds
    counter = [10**6]

    async def producer() -> None:
        tick = 0.1
        while time.monotonic() < stop:
            began = time.monotonic()
            batch = []
            for _ in range(int(flow * tick)):
                counter[0] += 1
                batch.append(stream.debit(tenants[counter[0] % len(tenants)], counter[0],
                                          T0 + timedelta(days=20, seconds=counter[0] % 86400)))
            await bus.publish(batch)
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - began)))

    async def reader(client: httpx.AsyncClient) -> None:
        interval = 1 / rps
        n = 0
        while time.monotonic() < stop:
            began = time.monotonic()
            tenant = tenants[n % len(tenants)]
            n += 1
            r = await client.get(f"{url}/v1/accounts/{tenant}/balance", headers=headers[tenant])
            latencies.append(time.monotonic() - began)
            assert r.status_code == 200, r.text
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def freshness(client: httpx.AsyncClient) -> None:
        probe = tenants[0]
        while time.monotonic() < stop - 2:
            before = (await client.get(f"{url}/v1/accounts/{probe}/balance", headers=headers[probe])).json()
            counter[0] += 1
            sent = time.monotonic()
            await bus.publish([stream.debit(probe, counter[0], T0 + timedelta(days=21))])
            while time.monotonic() - sent < 10:
                now = (await client.get(f"{url}/v1/accounts/{probe}/balance", headers=headers[probe])).json()
                if now["position"] > before["position"] and now["wallets"][0]["balance"] != before["wallets"][0][
                        "balance"]:
                    visible.append(time.monotonic() - sent)
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.2)

    headers = {t: {"Authorization": f"Bearer {mint_token(settings, role='viewer', tenant=t)}"} for t in tenants}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(producer(), reader(client), freshness(client))
    finally:
        await bus.stop()
    return {"balance_reads": len(latencies), "balance_read_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "balance_read_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "balance_read_mean_ms": round(statistics.mean(latencies) * 1000, 2) if latencies else float("nan"),
            "event_to_visible_p99_ms": round(percentile(visible, 0.99) * 1000, 1),
            "event_to_visible_samples": len(visible)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    base = Settings.from_env()
    if not base.kafka_bootstrap_servers or not base.database_url:
        raise SystemExit("set KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (see `make stack-up`)")
    namespace = "bench" + uuid.uuid4().hex[:8]
    settings = Settings(**{**base.__dict__, "namespace": namespace})
    stream = Stream()
    tenants = [f"bench-{i:05d}" for i in range(args.tenants)]
    messages = [m for t in tenants for m in stream.opened(t)]
    per_tenant = max(0, (args.events - len(messages)) // len(tenants))
    for n in range(per_tenant):
        for i, tenant in enumerate(tenants):
            messages.append(stream.debit(tenant, n * len(tenants) + i, T0 + timedelta(seconds=n)))
    started = time.monotonic()
    await publish(settings, messages)
    result: dict[str, Any] = {"namespace": namespace, "events": len(messages), "tenants": len(tenants),
                              "publish_seconds": round(time.monotonic() - started, 2)}
    schema = settings.schema("projections")
    report = await rebuild(settings, schema=schema, batch_records_max=args.batch)
    result.update(rebuild_events=report.events, rebuild_seconds=round(report.seconds, 2),
                  rebuild_events_per_second=report.events_per_second)
    process = None
    try:
        if args.seconds > 0:
            port = free_port()
            env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
                   "DATABASE_URL": settings.database_url or "", "BILLING_NAMESPACE": namespace}
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{namespace}-projections.log"
            process = ServiceProcess(["serve", "projections", "--port", str(port)], env, log, port).start()
            result.update(await reads_under_flow(settings, f"http://127.0.0.1:{port}", stream, tenants, args.rps,
                                                 args.flow, args.seconds))
    finally:
        if process is not None:
            process.stop()
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=5_000, help="records per replay transaction")
    parser.add_argument("--rps", type=int, default=200, help="balance reads per second")
    parser.add_argument("--flow", type=int, default=5_000, help="usage events per second during the reads")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the read test (0: skip)")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
