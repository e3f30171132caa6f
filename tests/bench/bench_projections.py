"""Projections benchmark on the real stack (Kafka + PostgreSQL): rebuild replay speed and balance reads.

1. Publishes ``--events`` ledger events (``--tenants`` accounts: opened, granted, then usage debits shaped
   exactly like the ledger relay's) to a fresh namespace's ``billing.ledger.events``.
2. ``billing projections rebuild`` (in process): drop + replay from offset 0 to the end; events/s.
3. Starts ``billing serve projections`` (``--role all``: the API, its consumer in a child process; ``inline``:
   both in one process, the former design) on the rebuilt schema and, while ``--flow`` usage events/s keep
   arriving (published by another process), reads balances at ``--rps`` requests/s for ``--seconds``:
   p50/p99 latency, and the time from publishing a debit to seeing it in the balance (p99).

The machine's load average is part of the output: the figures mean little on a machine busy with other work.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 DATABASE_URL=postgresql://billing:billing@127.0.0.1:55432/billing \\
        .venv/bin/python tests/bench/bench_projections.py --events 200000

Targets (issue 6): rebuild >= 50,000 events/s; balance read p99 < 5 ms at 200 req/s during 5,000 events/s;
event -> visible balance p99 < 1 s. Prints one JSON line; the namespace's topics and schemas are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import psutil
import uvloop
from aiokafka.partitioner import DefaultPartitioner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from billing_events import ids, topics
from billing_events.messages import LedgerEvent
from billing_projections.limits import REBUILD_BATCH_RECORDS_MAX
from billing_projections.rebuild import rebuild
from billing_runtime.auth import mint_token
from billing_runtime.bus import KafkaBus, OutMessage
from billing_runtime.settings import Settings

from tests.bench.harness.backlog import publish
from tests.bench.harness.probes import KeepAliveClient, _open_loop
from tests.bench.harness.resources import host_speed_ms
from tests.namespaces import drop_namespaces, namespace_of
from tests.support import ServiceProcess, free_port

U = 10**9
T0 = datetime(2026, 11, 1, tzinfo=UTC)
# Reads before the measured ones (connections, query plans), and how often the freshness probe polls by default:
# every 20 ms, a resolution far below the 1 s target. Until session 11 it polled every 5 ms, ~50 reads/s on top of
# the 200/s the target states (``--freshness-poll-ms 5`` reproduces those runs).
READ_WARM_UP = 20
FRESHNESS_POLL_MS = 20


class Stream:
    """Relay-shaped ledger events with increasing positions (the ledger's notification ids)."""

    def __init__(self) -> None:
        self.position = 0
        self.versions: dict[str, int] = {}
        self._aggregates: dict[str, str] = {}
        self._grants: dict[str, str] = {}

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
        return self.event(tenant, "UsageDebited", self._debit_data(tenant, n, at), at)

    def fast_debit(self, tenant: str, n: int, at: datetime) -> OutMessage:
        """``debit`` without the pydantic model (a tenth of the CPU): the flow's producer is load, not what is
        measured, and on a 2-core machine its CPU is taken from the services. Same bytes (checked by ``_flow``)."""
        self.position += 1
        aggregate = self._aggregates.get(tenant)
        if aggregate is None:
            aggregate = self._aggregates[tenant] = str(ids.account_id(tenant))
        version = self.versions[aggregate] = self.versions.get(aggregate, 0) + 1
        envelope = {"schema": "ledger.event/v1", "position": self.position, "aggregate_id": aggregate,
                    "aggregate_version": version, "type": "BillingAccount.UsageDebited", "tenant": None,
                    "recorded_at": at.isoformat().replace("+00:00", "Z"), "data": self._debit_data(tenant, n, at)}
        return OutMessage(topics.LEDGER_EVENTS, aggregate, orjson.dumps(envelope), (("schema", b"ledger.event/v1"),))

    def _debit_data(self, tenant: str, n: int, at: datetime) -> dict[str, Any]:
        grant = self._grants.get(tenant)
        if grant is None:
            grant = self._grants[tenant] = str(ids.grant_id(tenant, "bench"))
        amount = U // 5
        model = ("gpt-4o", "gpt-4o-mini")[n % 2]
        return {
            "command_id": str(ids.usage_command_id(tenant, f"e{n}")), "meter": "ai_tokens", "unit": "USD",
            "amount": amount, "overage": 0, "credit_grant": None, "at": at.isoformat(),
            "postings": [{"account": "tenant_wallet", "unit": "USD", "amount": amount, "grant_id": grant},
                         {"account": "recognised_revenue", "unit": "USD", "amount": -amount, "grant_id": grant}],
            "draws": [{"grant_id": grant, "amount": amount}],
            "cause": {"event_ids": [f"e{n}"], "period": at.strftime("%Y-%m"), "quantity": "1200",
                      "usage_type": "ai", "model": model, "operation": "chat", "user": f"user-{n % 7}",
                      "tokens": {"input": "1000", "output": "200"},
                      "properties": {"model": model, "operation": "chat", "user": f"user-{n % 7}"}},
        }


class CpuWatch:
    """CPU used during a phase: by the whole machine (both cores, every process: other engineers' work too)
    and by the given processes and their children (the service under test). A run on a machine busy with
    other work says so, and CPU per event compares runs far better than events/s on a shared machine."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.machine = psutil.cpu_times()
        self.started = time.monotonic()
        self.own = self._own()
        self.root = self._root()
        self.stack = self._stack()

    def _root(self) -> float:
        """CPU seconds of the first process alone (``serve projections``: the API, without its consumer child)."""
        try:
            times = psutil.Process(self.pids[0]).cpu_times()
            return times.user + times.system
        except (psutil.Error, IndexError):
            return 0.0

    @staticmethod
    def _stack() -> dict[str, float]:
        """CPU seconds so far of the stack's servers on this machine: PostgreSQL's processes, Kafka's JVM."""
        found = {"postgres": 0.0, "kafka": 0.0}
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                name = proc.info["name"] or ""
                group = ("postgres" if name.startswith("postgres") else
                         "kafka" if name == "java" and "kafka" in " ".join(proc.info["cmdline"] or ()) else None)
                if group:
                    times = proc.cpu_times()
                    found[group] += times.user + times.system
                    parent = proc.parent()
                    if group == "postgres" and not (parent and (parent.name() or "").startswith("postgres")):
                        # the postmaster: what its backends that have exited used (a rebuild's connections)
                        found[group] += times.children_user + times.children_system
            except psutil.Error:
                continue
        return found

    def _own(self) -> float:
        total = 0.0
        for pid in self.pids:
            if pid == os.getpid():  # and its children that have exited (rebuild workers)
                reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
                total += reaped.ru_utime + reaped.ru_stime
            try:
                root = psutil.Process(pid)
                for proc in (root, *root.children(recursive=True)):
                    times = proc.cpu_times()
                    total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def result(self, prefix: str, events: int = 0) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        now = psutil.cpu_times()
        busy = sum(getattr(now, f) - getattr(self.machine, f) for f in ("user", "nice", "system", "irq", "softirq"))
        found: dict[str, Any] = {f"{prefix}_machine_busy_percent": round(100 * busy / (elapsed * (os.cpu_count() or 1)))}
        own = (self._own() - self.own) if self.pids else 0.0
        if self.pids:
            found[f"{prefix}_service_cpu_percent"] = round(100 * own / elapsed)
            if events:
                found[f"{prefix}_service_cpu_us_per_event"] = round(own / events * 1e6, 1)
                root = self._root() - self.root
                found[f"{prefix}_service_children_cpu_us_per_event"] = round((own - root) / events * 1e6, 1)
        if events:  # where the rest of the machine's CPU went (PostgreSQL: its backends, live and exited)
            now_stack = self._stack()
            for group, before in self.stack.items():
                found[f"{prefix}_{group}_cpu_us_per_event"] = round((now_stack[group] - before) / events * 1e6, 1)
            found[f"{prefix}_machine_cpu_us_per_event"] = round(busy / events * 1e6, 1)
            # Everything else the machine did: during a rebuild, other work sharing the 2 cores (it makes the
            # service's own CPU per event grow too: the same rebuild measured 22.5 us with ~1 here and 32.5 with
            # ~7, session 13); during the reads, also the bench's own producer and reader.
            rest = busy - own - sum(now_stack[g] - before for g, before in self.stack.items())
            found[f"{prefix}_rest_cpu_us_per_event"] = round(rest / events * 1e6, 1)
        return found


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else float("nan")


def kafka_partition(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2 of the key, as the producer uses) picks."""
    return DefaultPartitioner()(key.encode(), list(range(partitions)), list(range(partitions)))


def _flow(settings: Settings, tenants: list[str], position: int, flow: int, seconds: float) -> int:
    """Usage debits at ``flow`` events/s for ``seconds``, in its own process (so producing costs the reader
    nothing); returns how many it published."""
    stream = Stream()
    stream.position = position
    check, fast = Stream(), Stream()
    for n in range(3):
        at = T0 + timedelta(days=20, seconds=n, microseconds=n * 7)
        assert check.debit(tenants[0], n, at) == fast.fast_debit(tenants[0], n, at), "fast_debit differs from debit"

    async def produce() -> int:
        bus = KafkaBus(settings.kafka_bootstrap_servers or "", namespace=settings.namespace)
        await bus.start()
        sent, tick, n = 0, 0.1, 0
        stop = time.monotonic() + seconds
        try:
            while time.monotonic() < stop:
                began = time.monotonic()
                batch = []
                for _ in range(int(flow * tick)):
                    n += 1
                    batch.append(stream.fast_debit(tenants[n % len(tenants)], 10**7 + n,
                                                   T0 + timedelta(days=20, seconds=n % 86400)))
                await bus.publish(batch)
                sent += len(batch)
                await asyncio.sleep(max(0.0, tick - (time.monotonic() - began)))
        finally:
            await bus.stop()
        return sent

    return asyncio.run(produce())


def _reads(url: str, tenants: list[str], headers: dict[str, dict[str, str]], rps: int, seconds: float,
           reader_loop: str = "uvloop") -> dict[str, Any]:
    """Balance reads at ``rps`` for ``seconds``, open loop (a read starts every ``1/rps`` s whether or not the
    previous one has answered, as clients do), in their own process (a client busy with other work would add
    its own delays to what it measures), with the e2e harness's minimal keep-alive client (httpx costs about a
    millisecond of client CPU per request, which a 2-core machine would report as server latency). Arrivals
    that find ``IN_FLIGHT_MAX`` reads in flight are counted as not sent (the server is not keeping up).
    Returns each read's latency in seconds and the count not sent."""
    async def read() -> dict[str, Any]:
        client = KeepAliveClient(url)
        latencies: list[float] = []
        skipped: list[float] = []

        async def one(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            began = time.perf_counter()
            status, body = await client.request("GET", f"/v1/accounts/{tenant}/balance", headers[tenant])
            latencies.append(time.perf_counter() - began)
            assert status == 200, body

        try:
            for i in range(READ_WARM_UP):  # connections, the first queries' plans
                await one(i)
            latencies.clear()
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(seconds, stop.set)
            cpu = time.process_time()
            await _open_loop(rps, stop, one, skipped)
            cpu = time.process_time() - cpu
        finally:
            await client.close()
        return {"latencies": latencies, "not_sent": len(skipped), "cpu": cpu}

    return uvloop.run(read()) if reader_loop == "uvloop" else asyncio.run(read())


async def reads_under_flow(settings: Settings, url: str, stream: Stream, tenants: list[str], rps: int, flow: int,
                           seconds: float, freshness_poll_ms: float = FRESHNESS_POLL_MS, reader_loop: str = "uvloop"
                           ) -> dict[str, Any]:
    """Balance reads at ``rps`` while ``flow`` debits/s arrive, and the time from publishing a debit to seeing it.

    The flow goes to the tenants of every partition but one (the producer runs in another process, with its own
    ledger positions); the freshness probe's tenant is alone on that partition, so the two streams' positions
    never interleave within a partition. The probe's debit waits behind the same consumer's work. The reader
    runs in a third process. The first probe (the consumer joining its group, the first batch's connections
    and plans) is a warm-up, not counted.

    Where a read's time goes on 2 cores (measured): the API's CPU is ~0.3 ms of it (api_balance.py); the tail
    is waiting for a core. A read is four wake-ups in turn (the API, its PostgreSQL backend, the API again, the
    reader) while the flow's producer, the consumer child, the consumer's backend and Kafka keep both cores
    about half busy; ~4 % of reads take over 3 ms, spread evenly over the run (not stalls: no collection runs
    in the API process during reads, and the slow reads do not follow the producer's 100 ms bursts), and
    ``perf sched`` shows the API waiting up to ~4 ms for a core, held most often by a PostgreSQL backend, then
    by the producer and the consumer. Tried without a measurable gain on the p99: a shorter scheduler slice
    for the API (``sched_setattr``), the consumer child in its own session (its own autogroup), the reader and
    the producer in theirs, one write for the response's head and body.
    """
    probe = tenants[0]
    probe_partition = kafka_partition(str(ids.account_id(probe)), settings.topic_partitions)
    flowing = [t for t in tenants if kafka_partition(str(ids.account_id(t)), settings.topic_partitions)
               != probe_partition]
    bus = KafkaBus(settings.kafka_bootstrap_servers or "", namespace=settings.namespace)
    await bus.start()
    visible: list[float] = []
    counter = [10**6]
    headers = {t: {"Authorization": f"Bearer {mint_token(settings, role='viewer', tenant=t)}"} for t in tenants}

    async def balance(client: KeepAliveClient) -> dict[str, Any]:
        status, body = await client.request("GET", f"/v1/accounts/{probe}/balance", headers[probe])
        assert status == 200, body
        return json.loads(body)

    async def one_probe(client: KeepAliveClient) -> float | None:
        before = await balance(client)
        counter[0] += 1
        sent = time.monotonic()
        await bus.publish([stream.debit(probe, counter[0], T0 + timedelta(days=21))])
        while time.monotonic() - sent < 10:
            now = await balance(client)
            if now["position"] > before["position"] and now["wallets"][0]["balance"] != before["wallets"][0][
                    "balance"]:
                return time.monotonic() - sent
            await asyncio.sleep(freshness_poll_ms / 1000)
        return None

    client = KeepAliveClient(url, connections=1)
    loop = asyncio.get_running_loop()
    try:
        warm_up = await one_probe(client)
        stop = time.monotonic() + seconds
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            produced = loop.run_in_executor(pool, _flow, settings, flowing, stream.position + 10**8, flow, seconds)
            read = loop.run_in_executor(pool, _reads, url, tenants, headers, rps, seconds, reader_loop)
            while time.monotonic() < stop - 2:
                found = await one_probe(client)
                if found is not None:
                    visible.append(found)
                await asyncio.sleep(0.2)
            flowed = await produced
            reads = await read
    finally:
        await client.close()
        await bus.stop()
    latencies = reads["latencies"]
    return {"balance_reads": len(latencies), "balance_reads_not_sent": reads["not_sent"],
            "balance_reader_loop": reader_loop,
            "balance_reader_cpu_us_per_read": round(reads["cpu"] / max(1, len(latencies)) * 1e6, 1),
            "balance_read_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "balance_read_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "balance_read_max_ms": round(max(latencies, default=float("nan")) * 1000, 2),
            "balance_read_mean_ms": round(statistics.mean(latencies) * 1000, 2) if latencies else float("nan"),
            "event_to_visible_p50_ms": round(percentile(visible, 0.5) * 1000, 1),
            "event_to_visible_p99_ms": round(percentile(visible, 0.99) * 1000, 1),
            "event_to_visible_max_ms": round(max(visible, default=float("nan")) * 1000, 1),
            "event_to_visible_warm_up_ms": round(warm_up * 1000, 1) if warm_up is not None else None,
            "event_to_visible_samples": len(visible), "freshness_poll_ms": freshness_poll_ms,
            "flow_events_sent": flowed,
            "flow_events_per_second": round(flowed / seconds), "probe_events_sent": counter[0] - 10**6}


async def applied_records(settings: Settings, schema: str) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return int(await conn.fetchval(f'SELECT COALESCE(SUM(next_offset), 0) FROM "{schema}".positions'))
    finally:
        await conn.close()


async def catch_up(settings: Settings, schema: str, total: int, timeout: float = 300) -> float:
    """Seconds until the consumer has applied every published record (its lag at the end of the flow)."""
    started = time.monotonic()
    while await applied_records(settings, schema) < total and time.monotonic() - started < timeout:
        await asyncio.sleep(0.1)
    return time.monotonic() - started


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
    result["host_speed_ms_before"] = host_speed_ms()
    result["load_average_before_rebuild"] = [round(x, 2) for x in os.getloadavg()]
    cpu = CpuWatch([os.getpid()])
    report = await rebuild(settings, schema=schema, batch_records_max=args.batch, workers=args.workers)
    result.update(cpu.result("rebuild", report.events))
    result.update(rebuild_events=report.events, rebuild_seconds=round(report.seconds, 2),
                  rebuild_events_per_second=report.events_per_second, rebuild_workers=args.workers or "per cpu",
                  cpus=os.cpu_count(), load_average_after_rebuild=[round(x, 2) for x in os.getloadavg()])
    process = None
    try:
        if args.seconds > 0:
            port = free_port()
            env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
                   "DATABASE_URL": settings.database_url or "", "BILLING_NAMESPACE": namespace,
                   "BILLING_PROJECTIONS_CONSUMERS": str(args.consumers)}
            log = Path(os.environ.get("TMPDIR", "/tmp")) / f"{namespace}-projections.log"
            process = ServiceProcess(["serve", "projections", "--port", str(port), "--role", args.role], env, log,
                                     port).start()
            flow_started = time.monotonic()
            assert process.proc is not None
            cpu = CpuWatch([process.proc.pid])
            result.update(await reads_under_flow(settings, f"http://127.0.0.1:{port}", stream, tenants, args.rps,
                                                 args.flow, args.seconds, args.freshness_poll_ms, args.reader_loop))
            flowed = result["flow_events_sent"] + result["probe_events_sent"]
            result.update(cpu.result("reads", flowed))
            lag_seconds = await catch_up(settings, schema, len(messages) + flowed)
            result.update(catch_up_seconds_after_flow=round(lag_seconds, 2),
                          consumer_events_per_second=round(flowed / (time.monotonic() - flow_started)))
            result.update(serve_role=args.role, consumer_processes=args.consumers if args.role == "all" else 0,
                          load_average_after_reads=[round(x, 2) for x in os.getloadavg()])
        result["host_speed_ms_after"] = host_speed_ms()
    finally:
        if process is not None:
            process.stop()
        # The namespace's topics too: left on the broker, every run's partitions slow its next start.
        await drop_namespaces(settings.kafka_bootstrap_servers, settings.database_url,
                              lambda name: namespace_of(name) == namespace)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--tenants", type=int, default=1_000)
    parser.add_argument("--batch", type=int, default=REBUILD_BATCH_RECORDS_MAX, help="records per replay transaction")
    parser.add_argument("--rps", type=int, default=200, help="balance reads per second")
    parser.add_argument("--flow", type=int, default=5_000, help="usage events per second during the reads")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the read test (0: skip)")
    parser.add_argument("--freshness-poll-ms", type=float, default=FRESHNESS_POLL_MS,
                        help="how often the freshness probe reads its balance while it waits for its debit")
    parser.add_argument("--reader-loop", default="uvloop", choices=("uvloop", "asyncio"),
                        help="the balance reader's event loop (asyncio: as until session 11)")
    parser.add_argument("--workers", type=int, default=None, help="rebuild processes (default: one per CPU)")
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes (role all)")
    parser.add_argument("--role", default="all", choices=("all", "inline"),
                        help="serve projections as API + consumer child (all) or both in one process (inline)")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
