"""`billing serve ledger`'s outbox relay in a process of its own, on real Kafka and PostgreSQL.

* The relay child publishes every recorded event to ``billing.ledger.events``, each aggregate's in recorded order,
  and records its position.
* The relay child killed (SIGKILL) while events are recorded: the service stops too (a supervisor restarts it);
  restarted, nothing recorded is missing from the topic and each aggregate's events still come in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication
from billing_ledger.relay import RELAY_NAME

from tests.integration.ledger_support import Ledger, command
from tests.namespaces import scratch_namespace
from tests.support import wait_until

pytestmark = pytest.mark.integration

TENANTS = 6


@pytest.fixture
def ledger(infra: dict[str, str], tmp_path: Path) -> Iterator[Ledger]:
    namespace = scratch_namespace("tl")
    env = {**infra, "BILLING_NAMESPACE": namespace, "BILLING_DATA_DIR": str(tmp_path / "var")}
    env.pop("BILLING_LEDGER_RELAY", None)  # the default: the relay in a child process
    yield Ledger(env, namespace, tmp_path)
    with psycopg.connect(infra["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}_billing_ledger" CASCADE')


def send(ledger: Ledger, commands: list[LedgerCommand]) -> None:
    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=ledger.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all",
                                    enable_idempotence=True, linger_ms=5)
        await producer.start()
        try:
            futures = [await producer.send(ledger.topic(topics.LEDGER_COMMANDS), c.to_json(),
                                           key=str(ids.account_id(c.tenant or "")).encode()) for c in commands]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(produce())


def setup_commands(tenants: list[str]) -> list[LedgerCommand]:
    return [command("account.open", t, {"currency": "USD"}, "open") for t in tenants] + [
        command("credit.grant", t, {"grant_key": "g", "unit": "USD", "amount": "1000", "source": "purchase"}, "grant")
        for t in tenants]


def debits(tenants: list[str], count: int, run: str) -> list[LedgerCommand]:
    return [command("usage.debit", tenants[i % len(tenants)],
                    {"unit": "USD", "amount_subunits": 1_000 + i, "meter": "tokens", "at": datetime.now(UTC).isoformat()},
                    f"{run}-{i}") for i in range(count)]


def published(ledger: Ledger) -> list[tuple[int, int, dict[str, object]]]:
    """Every record on the namespace's ``billing.ledger.events``: (partition, offset, envelope), in offset order."""
    async def read() -> list[tuple[int, int, dict[str, object]]]:
        topic = ledger.topic(topics.LEDGER_EVENTS)
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=ledger.env["KAFKA_BOOTSTRAP_SERVERS"], group_id=None,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            records: list[tuple[int, int, dict[str, object]]] = []

            def take(polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
                for batch in polled.values():
                    records.extend((r.partition, r.offset, orjson.loads(r.value or b"")) for r in batch)

            while not consumer.assignment():
                take(await consumer.getmany(timeout_ms=200))
            ends = await consumer.end_offsets(list(consumer.assignment()))
            deadline = time.monotonic() + 60

            async def behind() -> bool:
                return any([await consumer.position(p) < end for p, end in ends.items()])

            while await behind() and time.monotonic() < deadline:
                take(await consumer.getmany(timeout_ms=500))
            return sorted(records, key=lambda r: (r[0], r[1]))
        finally:
            await consumer.stop()

    return asyncio.run(read())


def assert_relayed_in_order(ledger: Ledger, store: LedgerApplication) -> int:
    """Every recorded event is on the topic, and each aggregate's first copies come in recorded order."""
    last = store.recorder.max_notification_id() or 0
    records = published(ledger)
    positions = {int(envelope["position"]) for _, _, envelope in records}  # type: ignore[call-overload]
    assert positions == set(range(1, last + 1)), "an event recorded is missing from the topic"
    seen: set[int] = set()
    versions: dict[str, int] = {}
    for _, _, envelope in records:
        position = int(envelope["position"])  # type: ignore[call-overload]
        if position in seen:  # a re-publication after a crash (consumers drop it by position)
            continue
        seen.add(position)
        aggregate, version = str(envelope["aggregate_id"]), int(envelope["aggregate_version"])  # type: ignore[call-overload]
        assert version == versions.get(aggregate, 0) + 1, f"{aggregate} out of order at position {position}"
        versions[aggregate] = version
    return last


def relay_caught_up(store: LedgerApplication) -> bool:
    return (store.process_recorder.max_tracking_id(RELAY_NAME) or 0) >= (store.recorder.max_notification_id() or 0)


def relay_pid(log_path: Path) -> int:
    started = [json.loads(line) for line in log_path.read_text(errors="replace").splitlines()
               if '"relay_process_started"' in line]
    assert started, "the ledger logs its relay child's pid"
    return int(started[-1]["pid"])


def receipts(ledger: Ledger, command_ids: list[uuid.UUID]) -> int:
    with psycopg.connect(ledger.env["DATABASE_URL"]) as conn:
        row = conn.execute(f'SELECT count(DISTINCT originator_id) FROM "{ledger.schema}".ledger_events '
                           "WHERE originator_id = ANY(%s)", (command_ids,)).fetchone()
    return int(row[0]) if row else 0


def test_the_relay_process_publishes_what_the_service_records_in_order(ledger: Ledger) -> None:
    tenants = [f"relay-{i}" for i in range(TENANTS)]
    sent = setup_commands(tenants) + debits(tenants, 600, "a")
    service = ledger.process("ledger").start()
    store = ledger.store()
    try:
        send(ledger, sent)
        wait_until(lambda: receipts(ledger, [c.command_id for c in sent]) == len(sent), timeout=90,
                   what="every command applied")
        wait_until(lambda: relay_caught_up(store), timeout=60, what="the relay to record its position")
        assert_relayed_in_order(ledger, store)
        assert service.proc is not None and service.proc.poll() is None
    finally:
        service.stop()
        store.close()


def test_the_service_stops_with_its_relay_process_and_a_restart_loses_nothing(ledger: Ledger) -> None:
    tenants = [f"gone-{i}" for i in range(TENANTS)]
    first = ledger.process("ledger-1").start()
    store = ledger.store()
    try:
        send(ledger, setup_commands(tenants) + debits(tenants, 1_500, "a"))
        wait_until(lambda: (store.process_recorder.max_tracking_id(RELAY_NAME) or 0) > 0, timeout=90,
                   what="the relay to publish something")
        send(ledger, debits(tenants, 1_500, "b"))
        pid = relay_pid(first.log_path)
        os.kill(pid, signal.SIGKILL)
        assert first.proc is not None
        wait_until(lambda: first.proc is not None and first.proc.poll() is not None, timeout=30,
                   what="the service to stop with its relay process")
        second = ledger.process("ledger-2").start()
        try:
            later = debits(tenants, 600, "c")
            send(ledger, later)
            wait_until(lambda: receipts(ledger, [c.command_id for c in later]) == len(later), timeout=90,
                       what="the restarted service to apply new commands")
            wait_until(lambda: relay_caught_up(store), timeout=60, what="the new relay to catch up")
            assert assert_relayed_in_order(ledger, store) > 3_600
        finally:
            second.stop()
    finally:
        first.stop()
        store.close()
