"""A backlog for a bench: messages published to a namespace's topics before the service under test starts."""

from __future__ import annotations

from billing_runtime.bus import KafkaBus, OutMessage
from billing_runtime.settings import Settings

PUBLISH_CHUNK_MESSAGES = 20_000


async def publish(settings: Settings, messages: list[OutMessage]) -> None:
    """Every message, in order, in chunks of ``PUBLISH_CHUNK_MESSAGES`` (settings: the broker, partitions, namespace)."""
    bus = KafkaBus(settings.kafka_bootstrap_servers or "", settings.topic_partitions, namespace=settings.namespace)
    await bus.start()
    try:
        for start in range(0, len(messages), PUBLISH_CHUNK_MESSAGES):
            await bus.publish(messages[start:start + PUBLISH_CHUNK_MESSAGES])
    finally:
        await bus.stop()
