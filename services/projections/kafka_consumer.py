"""The projections consumer's Kafka loop: every poll, the batches of ALL its partitions in ONE transaction.

The bus's generic loop (``billing_runtime.bus.KafkaBus.consume``) hands a handler one partition at a time, a
transaction and an offset commit each. Projections keep their positions in PostgreSQL with their rows, so
they can apply a whole poll (up to ``CONSUMER_BATCH_RECORDS_MAX`` records, any partitions) at once
(``ProjectionService.handle_partitions``): when events arrive steadily in small batches this saves most of
the round trips, which is what bounds the time from an event to a visible balance. The contract is the
bus's: on (re)assignment each partition starts at its stored position; offsets are committed to Kafka only
after the transaction (for monitoring; the stored positions are what counts); a failing batch is retried,
never skipped; on stop the batch in hand finishes or is not committed.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from billing_events import topics
from billing_projections.limits import CONSUMER_BATCH_RECORDS_MAX, CONSUMER_RETRY_SECONDS_MAX
from billing_projections.service import ProjectionService
from billing_runtime.logging import get_logger
from billing_runtime.settings import Settings
from prometheus_client import Histogram

log = get_logger(__name__)

PROGRESS_LOG_SECONDS = 10.0
POLL_SECONDS = Histogram("projections_poll_seconds", "Time to apply one poll (all its partitions, one transaction)",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
POLL_RECORDS = Histogram("projections_poll_records", "Records in one poll",
                         buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000))


def physical_topic(settings: Settings, topic: str) -> str:
    return f"{settings.namespace}.{topic}" if settings.namespace else topic


async def consume_ledger_events(settings: Settings, service: ProjectionService, stopping: asyncio.Event) -> None:
    assert settings.kafka_bootstrap_servers, "the projections consumer loop needs Kafka"
    topic = physical_topic(settings, topics.LEDGER_EVENTS)
    group = settings.group("billing-projections")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers, group_id=group, client_id=f"billing-{group}",
        enable_auto_commit=False, auto_offset_reset="earliest", isolation_level="read_committed",
        max_poll_records=CONSUMER_BATCH_RECORDS_MAX)

    class _Seek(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            return None

        async def on_partitions_assigned(self, assigned: Any) -> None:
            parts = sorted(tp.partition for tp in assigned if tp.topic == topic)
            for part, offset in (await service.start_positions(topics.LEDGER_EVENTS, parts)).items():
                consumer.seek(TopicPartition(topic, part), offset)
            log.info("partitions_assigned", group=group, partitions=parts)

    consumer.subscribe([topic], listener=_Seek())
    await consumer.start()
    progress = _Progress()
    try:
        while not stopping.is_set():
            fetched = await consumer.getmany(timeout_ms=settings.poll_timeout_ms,
                                             max_records=CONSUMER_BATCH_RECORDS_MAX)
            # The client's own records, as a rebuild passes them (no ``Record`` copy of each: ~2 us per record;
            # ``handle_partitions`` reads their partition, offset, headers and value, and names the positions
            # after ``topic``).
            batches: list[list[Any]] = [raw for raw in fetched.values() if raw]
            if not batches:
                continue
            began = time.monotonic()
            if not await _apply(service, batches, stopping):
                for batch in batches:  # stopping: not applied, not committed, read again by whoever comes next
                    consumer.seek(TopicPartition(topic, batch[0].partition), batch[0].offset)
                break
            records = sum(len(b) for b in batches)
            took = time.monotonic() - began
            POLL_SECONDS.observe(took)
            POLL_RECORDS.observe(records)
            progress.add(records, took)
            try:
                await consumer.commit({TopicPartition(topic, b[0].partition): b[-1].offset + 1 for b in batches})
            except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                # A rebalance took a partition away meanwhile: its stored position is already right.
                log.warning("offset_commit_failed", error=repr(exc))
    finally:
        await consumer.stop()


class _Progress:
    """A log line every ``PROGRESS_LOG_SECONDS``: records applied, polls, and how long their transactions took."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.records = self.polls = 0
        self.busy = self.longest = 0.0

    def add(self, records: int, seconds: float) -> None:
        self.records += records
        self.polls += 1
        self.busy += seconds
        self.longest = max(self.longest, seconds)
        elapsed = time.monotonic() - self.since
        if elapsed >= PROGRESS_LOG_SECONDS:
            log.info("consumer_progress", records=self.records, polls=self.polls,
                     records_per_second=round(self.records / elapsed), busy_percent=round(100 * self.busy / elapsed),
                     poll_ms_mean=round(1000 * self.busy / self.polls, 1), poll_ms_max=round(1000 * self.longest, 1))
            self.reset()


async def _apply(service: ProjectionService, batches: list[list[Any]], stopping: asyncio.Event) -> bool:
    """Until it succeeds (infrastructure errors are retried, never skipped); False when stopping first."""
    delay = 0.1
    while True:
        try:
            await service.handle_partitions(batches, topics.LEDGER_EVENTS)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("projection_batch_failed_will_retry", partitions=[b[0].partition for b in batches],
                          records=sum(len(b) for b in batches))
            if stopping.is_set():
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONSUMER_RETRY_SECONDS_MAX)
