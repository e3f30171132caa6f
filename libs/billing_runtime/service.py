"""What a service hands to a runner: its HTTP routes, its consumers, and its background tasks.

``billing serve <name>`` runs one of these against Kafka + PostgreSQL; ``billing run`` runs all four in
one process on the embedded bus and SQLite. The handler code is the same in both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter

from billing_runtime.bus import Handler, StartPositions


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """A background task's wait between rounds: ``seconds``, or less if the service is stopping meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)


async def committed_positions(topic: str, partitions: list[int]) -> dict[int, int]:
    """Start where the consumer group committed: for handlers that are idempotent on redelivery."""
    return {}


@dataclass
class ConsumerSpec:
    group_id: str
    topics: Sequence[str]
    handler: Handler
    start_positions: StartPositions = committed_positions
    # One handler call per poll with every partition's records (see ``billing_runtime.bus``).
    whole_poll: bool = False


@dataclass
class ServiceParts:
    name: str
    routers: list[APIRouter] = field(default_factory=list)
    consumers: list[ConsumerSpec] = field(default_factory=list)
    # Long-running coroutines (e.g. the ledger's outbox relay), started with the service, given a stop event.
    tasks: list[Callable[..., Awaitable[None]]] = field(default_factory=list)
    ready: Callable[[], Awaitable[bool]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    # Routes whose request body limit is not the app's default: path template -> bytes (billing_runtime.body_limit).
    body_limits: dict[str, int] = field(default_factory=dict)
