"""Rating throughput through real Kafka + PostgreSQL: accepted usage in, ledger commands out.

    eval "$(bash deploy/local/stack.sh env)"
    flock /tmp/bench.lock .venv/bin/python tests/bench/bench_rating.py --events 50000

Produces N accepted usage events (many tenants, a graduated meter and a per-unit meter) into a fresh
namespace, then runs the rating consumer in this process and measures until every ledger command is out.

Method (what the figures mean):

* The catalogue is published on the ledger events topic as in production, and also handed to rating's
  store before it starts, as a running rating service already knows it: the clock does not measure the
  catalogue consumer racing the usage consumer (a lost race costs a CatalogBehind retry with back-off).
* ``events_per_second`` runs from the first batch handed to rating's handler (consumer started, group
  joined) to the moment the last ledger command is read back from Kafka; ``startup_seconds`` is what came
  before (bus, schema, group join) and ``events_per_second_with_startup`` counts it in, as the first
  version of this bench did.
* The ledger commands are counted in a separate process, so that reading them back (one JSON decode per
  command) is not charged to rating's CPU or competes for its interpreter.
* ``cpu_us_per_event``: CPU time (user + system) of each process over the same window, per usage event.
  ``rating`` is this process (the rating service and its Kafka clients; nothing else runs in it during the
  window); ``others`` is the rest of the machine (other engineers' runs): when it is high, events/s is
  lower than the code allows, and the CPU figures are the ones to compare.
* The consumer takes Settings' default poll size (``batch_records_max``, 2,000, what ``billing serve`` uses)
  unless ``--batch-records`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing
import os
import pstats
import resource
import sys
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageEvent
from billing_rating.app import build
from billing_rating.service import RatingService
from billing_runtime.bus import KafkaBus, Record, ensure_topics
from billing_runtime.db import open_database
from billing_runtime.logging import configure_logging
from billing_runtime.runner import Runner
from billing_runtime.service import ServiceParts
from billing_runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `tests.` importable
    sys.path.insert(0, str(ROOT))

from tests.bench.harness.resources import ResourceMonitor

CATALOG = {"meters": [
    {"code": "api_calls", "aggregation": "sum", "price": {"model": "graduated", "unit": "USD", "tiers": [
        {"up_to": "1000", "unit_amount": "0.01"}, {"up_to": "100000", "unit_amount": "0.008"},
        {"up_to": None, "unit_amount": "0.005"}]}},
    {"code": "compute_seconds", "aggregation": "sum", "price": {"model": "per_unit", "unit": "USD",
                                                                "unit_amount": "0.000012"}},
]}


def catalog_event() -> LedgerEvent:
    return LedgerEvent(position=1, aggregate_id=ids.catalog_id(), aggregate_version=2, type="Catalog.Published",
                       recorded_at=datetime.now(UTC), data={"version": 1, "document": CATALOG})


async def produce(bootstrap: str, namespace: str, events: int, tenants: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        await producer.send_and_wait(f"{namespace}.{topics.LEDGER_EVENTS}", catalog_event().to_json(),
                                     key=b"catalog")
        now = datetime.now(UTC)
        futures = []
        for i in range(events):
            tenant = f"t{i % tenants}"
            meter = "api_calls" if i % 3 else "compute_seconds"
            event = UsageEvent(id=f"e{i}", tenant=tenant, meter=meter, quantity=str(1 + i % 7), timestamp=now)
            message = AcceptedUsage(account_id=ids.account_id(tenant), event=event, accepted_at=now,
                                    source="bench", catalog_version=1)
            futures.append(await producer.send(f"{namespace}.{topics.USAGE_ACCEPTED}", message.to_json(),
                                               key=str(ids.account_id(tenant)).encode()))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _count_until(bootstrap: str, topic: str, expected: int, timeout_s: float, out: Any) -> tuple[int, float]:
    """(distinct command ids seen, monotonic time the last one was seen); says "ready" once connected."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    out.put("ready")
    seen: set[str] = set()
    last = time.monotonic()
    deadline = last + timeout_s
    try:
        while len(seen) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10000)
            for records in batches.values():
                for record in records:
                    seen.add(json.loads(record.value)["command_id"])
            if batches:
                last = time.monotonic()
    finally:
        await consumer.stop()
    return len(seen), last


def count_commands(bootstrap: str, topic: str, expected: int, timeout_s: float, out: Any) -> None:
    """Child process: counts the ledger commands, reports (count, monotonic time of the last one)."""
    out.put(asyncio.run(_count_until(bootstrap, topic, expected, timeout_s, out)))


class _NoOutput:
    """Learning a catalogue publishes nothing."""

    async def publish(self, messages: Any) -> None:
        assert not messages


async def seed_catalog(settings: Settings) -> None:
    """Rating's store learns the catalogue before the measured run, as a long-running service has."""
    db = await open_database("rating", settings)
    try:
        service = RatingService(db, _NoOutput())  # type: ignore[arg-type]
        await service.setup()
        await service.handle_ledger_events([Record(topics.LEDGER_EVENTS, 0, 0, b"catalog",
                                                   catalog_event().to_json())])
    finally:
        await db.close()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--batch-records", type=int, default=Settings().batch_records_max,
                        help="records per poll (default: Settings.batch_records_max, as `billing serve`)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="cProfile rating over the measured window and print its N costliest functions "
                             "(the profiler slows rating down: figures of such a run are not comparable)")
    args = parser.parse_args()
    configure_logging(json_output=True, level=40)
    bootstrap = os.environ["KAFKA_BOOTSTRAP_SERVERS"]
    namespace = "bench" + uuid.uuid4().hex[:8]
    settings = Settings(kafka_bootstrap_servers=bootstrap, database_url=os.environ["DATABASE_URL"],
                        namespace=namespace, batch_records_max=args.batch_records)
    await ensure_topics(bootstrap, settings.topic_partitions, [f"{namespace}.{t}" for t in topics.ALL_TOPICS])
    await produce(bootstrap, namespace, args.events, args.tenants)
    bus = KafkaBus(bootstrap, settings.topic_partitions, settings.batch_records_max, namespace=namespace)
    await seed_catalog(settings)

    results: Any = multiprocessing.get_context("spawn").Queue()
    counter = multiprocessing.get_context("spawn").Process(
        target=count_commands, args=(bootstrap, f"{namespace}.{topics.LEDGER_COMMANDS}", args.events, 600, results))
    counter.start()
    ready = await asyncio.to_thread(results.get)
    assert ready == "ready", ready
    monitor = ResourceMonitor({"rating": os.getpid(), "counter": counter.pid or 0})
    window: dict[str, Any] = {}
    profiler = cProfile.Profile() if args.cprofile else None

    async def build_measured(s: Settings, b: Any) -> ServiceParts:
        parts = await build(s, b)

        def measured(handler: Any) -> Any:
            async def first_call_starts_the_clock(records: list[Record]) -> None:
                if "started" not in window:
                    window["started"] = time.monotonic()
                    window["cpu"] = cpu_seconds()
                    window["sample"] = monitor.sample()
                    if profiler is not None:
                        profiler.enable()
                await handler(records)
            return first_call_starts_the_clock

        parts.consumers = [replace(c, handler=measured(c.handler)) if topics.USAGE_ACCEPTED in c.topics else c
                           for c in parts.consumers]
        return parts

    runner = Runner(settings, bus, [build_measured], "bench", None)
    launched = time.monotonic()
    await runner.start()
    monitor.sample()  # lists PostgreSQL's processes now that rating's pool is open (the next samples are cheap)
    done, last_seen = await asyncio.to_thread(results.get)
    cpu_end = cpu_seconds()
    if profiler is not None:
        profiler.disable()
    monitor._rounds = 0  # the next sample lists PostgreSQL's processes again: backends opened since count too
    end_sample = monitor.sample()
    counter.join()
    await runner.stop()

    started = window.get("started", launched)
    seconds = last_seen - started
    begin = window.get("sample", end_sample)
    cpu = {name: end_sample["cpu"].get(name, 0.0) - begin["cpu"].get(name, 0.0) for name in end_sample["cpu"]}
    cpu["rating"] = cpu_end - window.get("cpu", cpu_end)
    busy = end_sample["machine_busy"] - begin["machine_busy"]
    cpu["others"] = max(0.0, busy - sum(cpu.values()))
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "bench": "rating", "events": args.events, "commands": done, "batch_records": args.batch_records,
        "seconds": round(seconds, 2), "events_per_second": round(args.events / seconds),
        "startup_seconds": round(started - launched, 2),
        "events_per_second_with_startup": round(args.events / (last_seen - launched)),
        "cpu_us_per_event": {name: round(value / args.events * 1e6, 1) for name, value in sorted(cpu.items())},
        "cpu_cores_busy": round(busy / seconds, 2), "peak_rss_mb": round(rss_mb)}))
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(args.cprofile)
    if done < args.events:
        raise SystemExit(f"only {done} of {args.events} ledger commands arrived")


if __name__ == "__main__":
    asyncio.run(main())
