"""The message bus: Apache Kafka (aiokafka) for the real stack, a durable SQLite log for the embedded default.

Both give the same two things to a service's handler code:

* ``publish(messages)`` returns only when every message is durable (Kafka: acks=all, idempotent producer;
  embedded: committed to the log file);
* a consumer that hands one partition's batch at a time to ``handler(records)`` and commits the group
  offset only AFTER the handler returned (at-least-once). On assignment it asks the service where to
  start (``start_positions``): services keep their own positions next to their effects, which is what
  makes the effect exactly-once.

Neither sends a record larger than Kafka takes (``RECORD_BYTES_MAX``): ``publish`` refuses the whole call with
``RecordTooLarge`` before sending anything (``check_record_sizes``). Sent, the broker refused it, and the idempotent
producer's sequence of that partition was broken from then on: every later record to it failed
(``OutOfOrderSequenceNumber``), whatever its size.

A batch whose handler fails (the database unreachable, or a command that waits for one on another partition: a
``credit.grant`` for the catalogue it was checked against) is handed again later, never skipped, while the consumer
goes on with its other partitions (``_Retries``): the batch's partitions are read again from its first record after
a back-off, 0.1 s doubling up to ``RETRY_BACKOFF_SECONDS_MAX``. Before, the consumer retried it in place and no other
partition of the consumer moved meanwhile, so a command waiting for another partition of the same consumer waited
until it gave up.

``whole_poll=True`` hands the handler every partition's records of one poll at once (each partition's
records in order, partitions one after another) and commits all their offsets together afterwards: one
transaction and one publish per poll instead of one per partition. Only for handlers that do not keep a
position per partition (ingest, rating: their idempotency is by event id, not by offset).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, IllegalStateError, TopicAlreadyExistsError
from aiokafka.partitioner import murmur2
from billing_events.topics import ALL_TOPICS, RECORD_BYTES_MAX

from billing_runtime.db import SqliteDatabase
from billing_runtime.logging import get_logger

log = get_logger(__name__)

# A failed batch's partition is read again after a back-off doubling from the first to the last (``_Retries``).
RETRY_BACKOFF_SECONDS_MIN = 0.1
RETRY_BACKOFF_SECONDS_MAX = 5.0
PARTITION_CACHE_KEYS_MAX = 65536
# What a record costs beyond its key, value and headers: its batch's header (61 bytes) and its own lengths, offset
# and timestamp deltas (at most ~30), rounded up.
RECORD_OVERHEAD_BYTES = 128
# Records whose value is at most this are not measured further: their keys (ids) and headers (a schema, a position,
# an event type) are a few hundred bytes, so only a value above it can make a record too large (about 35 ns a record
# checked this way, against 275 ns measuring every one: the relay publishes up to 1,000 a round).
RECORD_VALUE_UNCHECKED_BYTES = RECORD_BYTES_MAX // 2


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def header(record: Record, name: str) -> bytes | None:
    """The value of a record's header ``name`` (the first one), or None."""
    for key, value in record.headers:
        if key == name:
            return value
    return None


@dataclass(frozen=True, slots=True)
class OutMessage:
    topic: str
    key: str
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = field(default=())


class RecordTooLarge(ValueError):
    """A message too large for one Kafka record: nothing of the ``publish`` call that carried it was sent."""


def record_bytes(message: OutMessage) -> int:
    """What ``message`` weighs against ``RECORD_BYTES_MAX``: key, value, headers and the record's overhead."""
    return (len(message.key.encode()) + len(message.value)
            + sum(len(name.encode()) + len(value) for name, value in message.headers) + RECORD_OVERHEAD_BYTES)


def check_record_sizes(messages: Sequence[OutMessage]) -> None:
    """Raises ``RecordTooLarge`` (naming the topic, key and size) if any message is larger than a Kafka record."""
    for m in messages:
        if len(m.value) > RECORD_VALUE_UNCHECKED_BYTES and record_bytes(m) > RECORD_BYTES_MAX:
            raise RecordTooLarge(f"a record of {record_bytes(m):,} bytes for {m.topic} (key {m.key}) is more than "
                                 f"the {RECORD_BYTES_MAX:,} bytes a Kafka record may be: nothing was sent")


Handler = Callable[[list[Record]], Awaitable[None]]
# Where to start reading each assigned partition: {partition: next offset}; missing -> committed/earliest.
StartPositions = Callable[[str, list[int]], Awaitable[dict[int, int]]]


class Bus(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def publish(self, messages: Sequence[OutMessage]) -> None: ...
    async def consume(
        self, group_id: str, topics: Sequence[str], handler: Handler, start_positions: StartPositions,
        stopping: asyncio.Event, whole_poll: bool = False,
    ) -> None: ...


class _Retries:
    """The partitions whose last batch failed, each with when to hand it again and the back-off it waited."""

    def __init__(self) -> None:
        self._due: dict[Any, tuple[float, float]] = {}  # partition -> (monotonic time due, back-off)

    def failed(self, partition: Any) -> float:
        """Records a failure of ``partition``'s batch; the back-off until it is handed again (seconds)."""
        previous = self._due.get(partition, (0.0, RETRY_BACKOFF_SECONDS_MIN / 2))[1]
        delay = min(previous * 2, RETRY_BACKOFF_SECONDS_MAX)
        self._due[partition] = (time.monotonic() + delay, delay)
        return delay

    def succeeded(self, partition: Any) -> None:
        self._due.pop(partition, None)

    def waiting(self, partition: Any) -> bool:
        """Whether ``partition`` waits for its back-off now."""
        due = self._due.get(partition)
        return due is not None and due[0] > time.monotonic()

    def due_now(self) -> list[Any]:
        """The partitions whose back-off is over (handed again, then ``succeeded`` or ``failed`` anew)."""
        now = time.monotonic()
        return [p for p, (at, _) in self._due.items() if at <= now]

    def next_due_seconds(self) -> float | None:
        """Seconds until the next back-off is over (None: none waits)."""
        return max(0.0, min(at for at, _ in self._due.values()) - time.monotonic()) if self._due else None


async def _handled(handler: Handler, records: list[Record]) -> bool:
    """Runs the handler once: False (logged) if it failed; the caller hands the records again later."""
    try:
        await handler(records)
        return True
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("handler_failed_will_retry", topic=records[0].topic, partition=records[0].partition,
                      first_offset=records[0].offset, records=len(records))
        return False


class KafkaBus:
    def __init__(self, bootstrap_servers: str, partitions: int = 6, batch_records_max: int = 500,
                 poll_timeout_ms: int = 200, client_id: str = "billing", namespace: str = "") -> None:
        self.bootstrap_servers = bootstrap_servers
        self.namespace = namespace
        self.partitions = partitions
        self.batch_records_max = batch_records_max
        self.poll_timeout_ms = poll_timeout_ms
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._partition_counts: dict[str, int] = {}

    def _physical(self, topic: str) -> str:
        return f"{self.namespace}.{topic}" if self.namespace else topic

    def _logical(self, topic: str) -> str:
        return topic[len(self.namespace) + 1:] if self.namespace else topic

    async def start(self) -> None:
        await ensure_topics(self.bootstrap_servers, self.partitions, [self._physical(t) for t in ALL_TOPICS])
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", enable_idempotence=True,
            linger_ms=5, client_id=self.client_id, max_batch_size=1024 * 1024,
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _partitions(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            assert self._producer is not None
            count = len(await self._producer.partitions_for(topic))
            self._partition_counts[topic] = count
        return count

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        """One record batch per partition: aiokafka's per-message ``send`` costs ~10 us of Python each."""
        producer = self._producer
        assert producer is not None, "bus not started"
        check_record_sizes(messages)  # before anything is sent: a refused record breaks the partition's sequence
        by_partition: dict[tuple[str, int], list[OutMessage]] = {}
        counts: dict[str, tuple[str, int]] = {}  # logical topic -> (physical topic, partitions), per call
        for m in messages:
            known = counts.get(m.topic)
            if known is None:
                physical = self._physical(m.topic)
                known = counts[m.topic] = (physical, await self._partitions(physical))
            topic, partitions = known
            # Kafka's own partitioning (murmur2 of the key), computed once per key: same as the default.
            partition = kafka_partition(m.key.encode(), partitions)
            by_partition.setdefault((topic, partition), []).append(m)
        futures = []
        for (topic, partition), items in by_partition.items():
            batch = producer.create_batch()
            for m in items:
                record = {"key": m.key.encode(), "value": m.value, "timestamp": None, "headers": list(m.headers)}
                if batch.append(**record) is None:  # full: send it, start the next one
                    futures.append(await _send_closed(producer, batch, topic, partition))
                    batch = producer.create_batch()
                    batch.append(**record)
            futures.append(await _send_closed(producer, batch, topic, partition))
        if futures:
            await asyncio.gather(*futures)

    async def consume(self, group_id: str, topics: Sequence[str], handler: Handler,
                      start_positions: StartPositions, stopping: asyncio.Event, whole_poll: bool = False) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers, group_id=group_id, client_id=f"{self.client_id}-{group_id}",
            enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
            max_poll_records=self.batch_records_max,
        )

        class _Seek(ConsumerRebalanceListener):  # type: ignore[misc]
            async def on_partitions_revoked(self, revoked: Any) -> None:
                return None

            async def on_partitions_assigned(self, assigned: Any) -> None:
                by_topic: dict[str, list[int]] = {}
                for tp in assigned:
                    by_topic.setdefault(tp.topic, []).append(tp.partition)
                for topic, parts in by_topic.items():
                    positions = await start_positions(bus._logical(topic), parts)
                    for part, offset in positions.items():
                        consumer.seek(TopicPartition(topic, part), offset)
                log.info("partitions_assigned", group=group_id, partitions=sorted(
                    f"{tp.topic}:{tp.partition}" for tp in assigned))

        bus = self

        async def commit(unit: list[tuple[TopicPartition, list[Record]]]) -> None:
            try:
                await consumer.commit({tp: part[-1].offset + 1 for tp, part in unit})
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced while the batch was handled: the effect is durable and the
                # service's own positions are the truth, so the next owner skips what we applied.
                log.warning("commit_skipped_after_rebalance", partitions=[
                    f"{tp.topic}:{tp.partition}" for tp, _ in unit], error=str(exc))

        consumer.subscribe([self._physical(t) for t in topics], listener=_Seek())
        await consumer.start()
        # The offset commit of a handled batch runs while the next batch is fetched and handled (one round
        # trip less per batch); it is awaited before the next commit and before the consumer stops.
        committing: asyncio.Task[None] | None = None
        retries = _Retries()  # partitions paused after a failed batch, until their back-off is over
        try:
            while not stopping.is_set():
                due = retries.due_now()
                if due:  # (a partition reassigned meanwhile starts afresh, unpaused)
                    consumer.resume(*[tp for tp in due if tp in consumer.assignment()])
                batches = await consumer.getmany(timeout_ms=self.poll_timeout_ms,
                                                 max_records=self.batch_records_max)
                polled = [(tp, [Record(self._logical(r.topic), r.partition, r.offset, r.key, r.value or b"",
                                       tuple(r.headers or ())) for r in raw])
                          for tp, raw in batches.items() if raw]
                units = [polled] if whole_poll and polled else [[one] for one in polled]
                for unit in units:
                    records = [r for _, part in unit for r in part]
                    if not await _handled(handler, records):
                        # Not applied, not committed: read again from its first record after the back-off, the
                        # other partitions going on meanwhile.
                        for tp, part in unit:
                            consumer.seek(tp, part[0].offset)
                            retries.failed(tp)
                        if stopping.is_set():
                            return
                        consumer.pause(*[tp for tp, _ in unit])
                        continue
                    for tp, _ in unit:
                        retries.succeeded(tp)
                    if committing is not None:
                        await committing
                    committing = asyncio.create_task(commit(unit))
        finally:
            if committing is not None:
                with contextlib.suppress(Exception):
                    await committing
            await consumer.stop()


async def _send_closed(producer: AIOKafkaProducer, batch: Any, topic: str, partition: int) -> Any:
    """Sends a complete batch now: a closed batch does not wait ``linger_ms`` for more records (the producer's
    linger is for single ``send`` calls; ours are whole batches, so lingering only adds latency)."""
    batch.close()
    return await producer.send_batch(batch, topic, partition=partition)


async def ensure_topics(bootstrap_servers: str, partitions: int, names: Sequence[str] = ALL_TOPICS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=1)
                   for t in names if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


@lru_cache(maxsize=PARTITION_CACHE_KEYS_MAX)
def kafka_partition(key: bytes, partitions: int) -> int:
    """The default partitioner's choice (murmur2, positive, modulo), cached per key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def partition_for(key: str, partitions: int) -> int:
    return zlib.crc32(key.encode()) % partitions


class EmbeddedBus:
    """A durable, partitioned log in one SQLite file: Kafka's contract, in-process, for the embedded default."""

    def __init__(self, path: Path, partitions: int = 6, batch_records_max: int = 500) -> None:
        self.partitions = partitions
        self.batch_records_max = batch_records_max
        self._db = SqliteDatabase(path)
        self._appended = asyncio.Condition()

    async def start(self) -> None:
        await self._db.connect()
        await self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS messages (
                topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL,
                key TEXT, value BLOB NOT NULL, headers TEXT NOT NULL,
                PRIMARY KEY (topic, partition, "offset"));
            CREATE TABLE IF NOT EXISTS group_offsets (
                group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                next_offset INTEGER NOT NULL, PRIMARY KEY (group_id, topic, partition));
            """
        )

    async def stop(self) -> None:
        await self._db.close()

    async def publish(self, messages: Sequence[OutMessage]) -> None:
        if not messages:
            return
        check_record_sizes(messages)  # what Kafka would refuse, refused here too
        import json

        async with self._db.transaction() as conn:
            for m in messages:
                part = partition_for(m.key, self.partitions)
                nxt = await conn.fetchval(
                    'SELECT COALESCE(MAX("offset") + 1, 0) FROM messages WHERE topic = $1 AND partition = $2',
                    m.topic, part)
                headers = json.dumps([[k, v.decode()] for k, v in m.headers])
                await conn.execute(
                    'INSERT INTO messages (topic, partition, "offset", key, value, headers) '
                    "VALUES ($1, $2, $3, $4, $5, $6)", m.topic, part, nxt, m.key, m.value, headers)
        async with self._appended:
            self._appended.notify_all()

    async def consume(self, group_id: str, topics: Sequence[str], handler: Handler,
                      start_positions: StartPositions, stopping: asyncio.Event, whole_poll: bool = False) -> None:
        """One partition's batch per handler call (``whole_poll`` changes nothing here: it is an optimisation)."""
        import json

        positions: dict[tuple[str, int], int] = {}
        for topic in topics:
            parts = list(range(self.partitions))
            starts = await start_positions(topic, parts)
            for part in parts:
                committed = await self._db.fetchval(
                    "SELECT next_offset FROM group_offsets WHERE group_id = $1 AND topic = $2 AND partition = $3",
                    group_id, topic, part)
                positions[(topic, part)] = starts.get(part, committed or 0)
        retries = _Retries()  # partitions whose last batch failed, until their back-off is over
        while not stopping.is_set():
            progressed = False
            for (topic, part), offset in list(positions.items()):
                if retries.waiting((topic, part)):
                    continue
                rows = await self._db.fetch(
                    'SELECT "offset", key, value, headers FROM messages WHERE topic = $1 AND partition = $2 '
                    'AND "offset" >= $3 ORDER BY "offset" LIMIT $4', topic, part, offset, self.batch_records_max)
                if not rows:
                    continue
                records = [
                    Record(topic, part, r["offset"], r["key"].encode() if r["key"] else None, bytes(r["value"]),
                           tuple((k, v.encode()) for k, v in json.loads(r["headers"])))
                    for r in rows
                ]
                if not await _handled(handler, records):  # read again after the back-off, the others go on
                    retries.failed((topic, part))
                    if stopping.is_set():
                        return
                    continue
                retries.succeeded((topic, part))
                positions[(topic, part)] = records[-1].offset + 1
                await self._db.execute(
                    "INSERT INTO group_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4) "
                    "ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                    group_id, topic, part, records[-1].offset + 1)
                progressed = True
            if not progressed:
                retry = retries.next_due_seconds()
                async with self._appended:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._appended.wait(),
                                               timeout=0.5 if retry is None else min(0.5, retry))
