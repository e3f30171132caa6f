"""Consumer-group progress from Kafka itself: committed offsets vs end offsets, sampled every second.

The services commit a batch's offsets only after its effect is durable, so a group's committed offset is
a faithful, external measure of how far that stage has got; ``end - committed`` is its lag.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

# stage -> (consumer group suffix, topic it consumes)
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("billing-ingest", "billing.usage.raw"),
    "rating": ("billing-rating", "billing.usage.accepted"),
    "ledger": ("billing-ledger", "billing.ledger.commands"),
    "projections": ("billing-projections", "billing.ledger.events"),
}
# The catalogue consumers (ingest and rating learn tenants and prices from the ledger's events).
CATALOG_GROUPS: dict[str, tuple[str, str]] = {
    "ingest-catalog": ("billing-ingest-catalog", "billing.ledger.events"),
    "rating-catalog": ("billing-rating-catalog", "billing.ledger.events"),
}
TOPICS = ("billing.usage.raw", "billing.usage.accepted", "billing.usage.rejected", "billing.ledger.commands",
          "billing.ledger.events")


@dataclass
class Snapshot:
    at: float  # time.time()
    end: dict[str, int]  # topic -> sum of end offsets
    committed: dict[str, int]  # stage -> sum of committed offsets of its group
    lag: dict[str, int]  # stage -> end(topic) - committed

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.at, 3), "end": self.end, "committed": self.committed, "lag": self.lag}


class KafkaWatch:
    def __init__(self, bootstrap: str, namespace: str, partitions: int) -> None:
        self.bootstrap = bootstrap
        self.namespace = namespace
        self.partitions = partitions
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    def topic(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def group(self, suffix: str) -> str:
        return f"{self.namespace}.{suffix}"

    async def start(self) -> None:
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await self._admin.start()
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._admin is not None:
            await self._admin.close()

    async def end_offsets(self, names: tuple[str, ...] | list[str] = TOPICS) -> dict[str, int]:
        assert self._consumer is not None
        tps = [TopicPartition(self.topic(n), p) for n in names for p in range(self.partitions)]
        ends = await self._consumer.end_offsets(tps)
        result = {n: 0 for n in names}
        for tp, offset in ends.items():
            result[tp.topic[len(self.namespace) + 1:]] += offset
        return result

    async def committed(self, groups: dict[str, tuple[str, str]] = STAGES) -> dict[str, int]:
        assert self._admin is not None
        names = list(groups)
        answers = await asyncio.gather(*(self._admin.list_consumer_group_offsets(self.group(groups[n][0]))
                                         for n in names))
        result: dict[str, int] = {}
        for name, offsets in zip(names, answers, strict=True):
            topic = self.topic(groups[name][1])
            result[name] = sum(max(meta.offset, 0) for tp, meta in offsets.items() if tp.topic == topic)
        return result

    async def snapshot(self) -> Snapshot:
        at = time.time()
        end, committed = await asyncio.gather(self.end_offsets(), self.committed())
        lag = {stage: end[topic] - committed[stage] for stage, (_, topic) in STAGES.items()}
        return Snapshot(at, end, committed, lag)

    async def caught_up(self, groups: dict[str, tuple[str, str]]) -> bool:
        """True when every group of ``groups`` has committed up to its topic's end."""
        end = await self.end_offsets(sorted({t for _, t in groups.values()}))
        committed = await self.committed(groups)
        return all(committed[name] >= end[topic] for name, (_, topic) in groups.items())


async def sample_every(watch: KafkaWatch, interval: float, out: list[Snapshot], stop: asyncio.Event) -> None:
    """Appends a snapshot every ``interval`` seconds (on a fixed schedule) until ``stop`` is set."""
    next_at = time.monotonic()
    while not stop.is_set():
        try:
            out.append(await watch.snapshot())
        except Exception as exc:  # noqa: BLE001 - a slow admin answer under load must not end the run
            print(f"[bench] lag sample failed: {exc!r}", flush=True)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay < 0:
            next_at = time.monotonic()
            delay = 0
        try:
            await asyncio.wait_for(stop.wait(), timeout=delay)
        except TimeoutError:
            pass
