"""Ingest as its own ``billing serve ingest`` process on real Kafka + PostgreSQL, in a namespace of its own:
duplicates are caught across a restart, every rejection reason is dead-lettered with its payload, and a
process killed with SIGKILL mid-stream loses nothing (every event sent is accepted, by event id)."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_runtime.bus import ensure_topics

from tests.namespaces import scratch_namespace
from tests.support import ServiceProcess, auth, drop_schema, free_port, wait_until

pytestmark = pytest.mark.integration

TENANTS = ("acme", "globex", "initech")
METERS = [{"code": "api_calls"}, {"code": "ai_tokens", "required_properties": ["model", "operation"]}]
PARTITIONS = 3


@dataclass
class IngestEnv:
    env: dict[str, str]
    namespace: str
    log_dir: Path
    bootstrap: str

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def start(self, name: str) -> ServiceProcess:
        port = free_port()
        process = ServiceProcess(["serve", "ingest", "--port", str(port)], self.env,
                                 self.log_dir / f"{name}.log", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return process


async def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10, enable_idempotence=True)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def produce(ingest: IngestEnv, records: list[tuple[bytes, bytes]], topic: str = topics.USAGE_RAW) -> None:
    asyncio.run(_produce(ingest.bootstrap, ingest.topic(topic), records))


async def _read_all(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        out: list[dict[str, Any]] = []
        remaining = {tp for tp in parts if ends[tp] > 0}
        while remaining:
            for tp, records in (await consumer.getmany(*remaining, timeout_ms=1000, max_records=20_000)).items():
                out.extend(json.loads(r.value) for r in records)
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
        return out
    finally:
        await consumer.stop()


def read_all(ingest: IngestEnv, topic: str) -> list[dict[str, Any]]:
    return asyncio.run(_read_all(ingest.bootstrap, ingest.topic(topic)))


def usage(event_id: str, tenant: str = "acme", **overrides: Any) -> dict[str, Any]:
    event = {"id": event_id, "tenant": tenant, "meter": "api_calls", "quantity": "1",
             "timestamp": datetime.now(UTC).isoformat()}
    event.update(overrides)
    return event


def record(event: dict[str, Any]) -> tuple[bytes, bytes]:
    return str(event.get("tenant", "x")).encode(), json.dumps(event).encode()


def accepted_ids(ingest: IngestEnv) -> list[str]:
    return [a["event"]["id"] for a in read_all(ingest, topics.USAGE_ACCEPTED)]


@pytest.fixture(scope="module")
def ingest(infra: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestEnv]:
    namespace = scratch_namespace("ti")
    log_dir = tmp_path_factory.mktemp("ingest-logs")
    env = {**infra, "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(log_dir / "var"),
           "BILLING_TOPIC_PARTITIONS": str(PARTITIONS), "BILLING_BATCH_RECORDS_MAX": "500"}
    bootstrap = infra["KAFKA_BOOTSTRAP_SERVERS"]
    asyncio.run(ensure_topics(bootstrap, PARTITIONS, [f"{namespace}.{t}" for t in topics.ALL_TOPICS]))
    now = datetime.now(UTC)
    learn = [LedgerEvent(position=1, aggregate_id=uuid.uuid4(), aggregate_version=1, type="Catalog.Published",
                         recorded_at=now, data={"version": 1, "document": {"meters": METERS}})]
    learn += [LedgerEvent(position=2 + i, aggregate_id=uuid.uuid4(), aggregate_version=1,
                          type="BillingAccount.Opened", recorded_at=now, data={"tenant": t, "currency": "USD"})
              for i, t in enumerate(TENANTS)]
    ingest_env = IngestEnv(env, namespace, log_dir, bootstrap)
    produce(ingest_env, [(b"catalog", e.to_json()) for e in learn], topics.LEDGER_EVENTS)
    yield ingest_env
    asyncio.run(_drop(infra, namespace))


async def _drop(infra: dict[str, str], namespace: str) -> None:
    """Deletes what this module created: its namespace's topics and ingest schema."""
    admin = AIOKafkaAdminClient(bootstrap_servers=infra["KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        await admin.delete_topics([f"{namespace}.{t}" for t in topics.ALL_TOPICS])
    finally:
        await admin.close()
    await drop_schema(infra["DATABASE_URL"], f"{namespace}_billing_ingest")


def wait_catalogue_learnt(ingest: IngestEnv) -> None:
    def accepted_probe() -> bool:
        probe = usage(f"probe-{uuid.uuid4().hex[:8]}", tenant=TENANTS[-1])
        response = httpx.post(f"{ingest.url}/v1/usage", json=probe, headers=auth("service"), timeout=5)
        return response.json()["results"][0]["status"] == "accepted"

    wait_until(accepted_probe, timeout=60, what="ingest to learn the catalogue")


def test_duplicates_are_caught_across_a_restart_of_the_ingest_process(ingest: IngestEnv) -> None:
    first = [usage(f"restart-a-{i}", TENANTS[i % 3]) for i in range(300)]
    process = ingest.start("restart-1")
    try:
        wait_catalogue_learnt(ingest)
        produce(ingest, [record(e) for e in first])
        wait_until(lambda: {f"restart-a-{i}" for i in range(300)} <= set(accepted_ids(ingest)), timeout=60,
                   what="the first 300 events accepted")
    finally:
        assert process.stop(signal.SIGTERM) == 0, process.log_tail()

    process = ingest.start("restart-2")
    try:
        # The same 300 again (Kafka), then one marker per tenant on the same partitions: once the markers
        # are accepted, the duplicates before them were processed too.
        markers = [usage(f"restart-marker-{t}", t) for t in TENANTS]
        produce(ingest, [record(e) for e in first] + [record(e) for e in markers])
        wait_until(lambda: {m["id"] for m in markers} <= set(accepted_ids(ingest)), timeout=60,
                   what="the markers accepted")
        over_http = httpx.post(f"{ingest.url}/v1/usage", json=first[:5], headers=auth("service"), timeout=10)
        assert [r["status"] for r in over_http.json()["results"]] == ["duplicate"] * 5
    finally:
        process.stop()
    counts = Counter(i for i in accepted_ids(ingest) if i.startswith("restart-"))
    assert len(counts) == 303
    assert set(counts.values()) == {1}, [i for i, n in counts.items() if n > 1][:5]


def test_every_rejection_reason_is_dead_lettered_with_its_payload(ingest: IngestEnv) -> None:
    now = datetime.now(UTC)
    bad: dict[str, bytes] = {
        "invalid_json": b'{"id": "dl-json", "tenant": ',
        "schema_invalid": json.dumps({"id": "dl-schema", "tenant": "acme", "quantity": "1"}).encode(),
        "invalid_quantity": json.dumps(usage("dl-qty", quantity="-2")).encode(),
        "naive_timestamp": json.dumps(usage("dl-naive", timestamp=now.replace(tzinfo=None).isoformat())).encode(),
        "future_timestamp": json.dumps(usage("dl-future", timestamp=(now + timedelta(hours=1)).isoformat())).encode(),
        "too_old": json.dumps(usage("dl-old", timestamp=(now - timedelta(days=40)).isoformat())).encode(),
        "payload_too_large": json.dumps(usage("dl-large", properties={"blob": "x" * 200} | {
            f"p{i}": "y" * 200 for i in range(100)})).encode(),
        "unknown_tenant": json.dumps(usage("dl-tenant", tenant="nobody")).encode(),
        "unknown_meter": json.dumps(usage("dl-meter", meter="teleportation")).encode(),
        "missing_property": json.dumps(usage("dl-prop", meter="ai_tokens", properties={"model": "m"})).encode(),
    }
    assert len(bad["payload_too_large"]) > 16 * 1024
    process = ingest.start("dead-letters")
    try:
        wait_catalogue_learnt(ingest)
        produce(ingest, [(b"acme", value) for value in bad.values()])

        def letters() -> dict[str, dict[str, Any]]:
            found = {d["reason"]: d for d in read_all(ingest, topics.USAGE_REJECTED)
                     if d["source"].startswith(f"kafka:{topics.USAGE_RAW}:")}
            return found if set(bad) <= set(found) else {}

        found = wait_until(letters, timeout=60, what="a dead letter for every reason")
    finally:
        process.stop()
    for reason, payload in bad.items():
        letter = found[reason]
        assert letter["payload"] == payload.decode(), reason
        assert letter["stage"] == "ingest" and letter["detail"] and letter["rejected_at"]
    assert found["invalid_quantity"]["event_id"] == "dl-qty"
    assert not {a["event"]["id"] for a in read_all(ingest, topics.USAGE_ACCEPTED)} & {
        "dl-json", "dl-schema", "dl-qty", "dl-naive", "dl-future", "dl-old", "dl-large", "dl-tenant", "dl-meter",
        "dl-prop"}


def test_an_ingest_process_killed_mid_stream_loses_nothing(ingest: IngestEnv) -> None:
    sent = [usage(f"kill-{i:06d}", TENANTS[i % 3], quantity=str(1 + i % 5)) for i in range(30_000)]
    learner = ingest.start("kill-0")
    wait_catalogue_learnt(ingest)  # known tenants and meters are kept in ingest's schema
    learner.stop()
    produce(ingest, [record(e) for e in sent])  # a backlog, so the kill lands mid-stream
    process = ingest.start("kill-1")
    # Kill it once it is visibly mid-stream: some accepted, not all.
    wait_until(lambda: 1000 <= sum(1 for i in accepted_ids(ingest) if i.startswith("kill-")), timeout=120,
               interval=0.05, what="ingest mid-stream")
    process.stop(signal.SIGKILL)
    before_restart = Counter(i for i in accepted_ids(ingest) if i.startswith("kill-"))
    assert len(before_restart) < len(sent), "the kill came too late to be mid-stream"

    process = ingest.start("kill-2")
    try:
        wanted = {e["id"] for e in sent}
        wait_until(lambda: wanted <= set(accepted_ids(ingest)), timeout=180, what="every event accepted")
    finally:
        process.stop()
    accepted = [a for a in read_all(ingest, topics.USAGE_ACCEPTED) if a["event"]["id"].startswith("kill-")]
    counts = Counter(a["event"]["id"] for a in accepted)
    assert set(counts) == wanted  # nothing lost, nothing invented
    # A batch in flight at the kill may be published twice: same event id, same content, which rating and
    # the ledger deduplicate by event id and command id. Anything else appears exactly once.
    by_id = {e["id"]: e for e in sent}
    for a in accepted:
        assert a["event"]["quantity"] == by_id[a["event"]["id"]]["quantity"]
    replayed = sum(n - 1 for n in counts.values())
    print(f"\n[ingest kill] accepted before kill: {len(before_restart)}, republished after restart: {replayed}")
    assert replayed <= 30_000
