"""Wiring of the projections service, in one of four roles.

* ``inline``: the query API and the consumer in this process (the embedded ``billing run``).
* ``api``: the query API and the dashboard only; they read the read models and write nothing.
* ``consumer``: the consumer only (``billing_projections.consumer``): it builds the read models.
* ``all`` (``billing serve projections``): the API in this process and the consumer in a child process
  (``BILLING_PROJECTIONS_CONSUMERS=N``: N children, one Kafka consumer group, sharing the partitions).

Projecting is CPU-bound pure Python: in one process it competes with the HTTP server for the event loop (and
the GIL, so a worker thread would not help), and a batch of thousands of events delays every read by as much.
In ``all`` the two share nothing but PostgreSQL: reads stay a single indexed query however fast events come.
The child is supervised (``billing_runtime.child``, as the ledger's relay process is): it dies with the parent
(it watches a pipe from it), and if it exits on its own the parent stops too, so the process supervisor restarts
both (as with any crashed consumer).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Awaitable, Callable

from billing_events import topics
from billing_projections.balance_cache import BalanceCache
from billing_projections.http import build_routers
from billing_projections.kafka_consumer import consume_ledger_events
from billing_projections.limits import (
    CONSUMER_PROCESSES_MAX,
    CONSUMER_STOP_SECONDS_MAX,
    READ_POOL_CONNECTIONS_MAX,
    READ_POOL_CONNECTIONS_MIN,
)
from billing_projections.service import ProjectionService
from billing_projections.tuning import freeze_startup_heap
from billing_runtime.bus import Bus
from billing_runtime.child import ChildProcess
from billing_runtime.db import Database, PostgresDatabase, open_database
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings

ROLES = ("inline", "api", "consumer", "all")
# Where invoice PDFs are served (the ledger's GET /v1/accounts/{tenant}/invoices/{id}.pdf). Unset: the ledger of
# the same stack (the embedded app itself, or the ledger's default port next to this service).
LEDGER_URL_ENV = "BILLING_LEDGER_URL"
# `all`: an HTTP port for the consumer child's /metrics and /healthz (unset: none; with several children,
# the first takes it and the next ones the following ports).
CONSUMER_PORT_ENV = "BILLING_PROJECTIONS_CONSUMER_PORT"
# `all`: consumer children (default 1; more use more cores, up to one per partition).
CONSUMERS_ENV = "BILLING_PROJECTIONS_CONSUMERS"


def ledger_url(settings: Settings) -> str:
    """Base URL of the ledger's HTTP API for links to invoice PDFs; "" means this same origin (embedded)."""
    configured = os.environ.get(LEDGER_URL_ENV)
    if configured is not None:
        return configured.rstrip("/")
    if settings.kafka_bootstrap_servers:  # `billing serve`: the ledger is its own process
        return f"http://{settings.http_host}:{settings.service_ports['ledger']}"
    return ""


async def build(settings: Settings, bus: Bus, role: str = "inline") -> ServiceParts:
    if role not in ROLES:
        raise ValueError(f"projections role must be one of {', '.join(ROLES)}, not {role!r}")
    db = await open_database("projections", settings)
    # The live consumer (consumer, inline) notifies the API's copy of balance states of what it changed.
    service = ProjectionService(db, notify_balances=role in ("consumer", "inline"))
    await service.setup()
    parts = ServiceParts(name=f"projections ({role})", close=db.close)
    cache: BalanceCache | None = None
    if role != "consumer":
        reads: Database = db
        if db.dialect == "postgres" and settings.database_url:
            # The API's own pool: its reads never change session state, so a read is one round trip (no reset).
            reads = reader = await PostgresDatabase(
                settings.database_url, settings.schema("projections"), READ_POOL_CONNECTIONS_MAX,
                pool_size_min=READ_POOL_CONNECTIONS_MIN, reset_sessions=False).connect()

            async def close() -> None:
                try:
                    await reader.close()
                finally:
                    await db.close()

            parts.close = close
            # Balance reads from the API's copy, kept by LISTEN (works with any consumer process, any replica).
            cache = BalanceCache(reads, settings.database_url, settings.schema("projections"))
            parts.tasks.append(cache.listen)
        parts.routers = build_routers(reads, ledger_url=ledger_url(settings), balance_cache=cache)
        if role in ("api", "all"):  # this process serves HTTP only
            freeze_startup_heap()
    if role == "inline":  # the bus's loop: embedded log or Kafka, one partition per transaction
        parts.consumers = [ConsumerSpec(settings.group("billing-projections"), [topics.LEDGER_EVENTS],
                                        service.handle_ledger_events, service.start_positions)]
    if role == "consumer":  # Kafka: a whole poll, all its partitions, per transaction (kafka_consumer.py)
        parts.tasks.append(functools.partial(consume_ledger_events, settings, service))
    if role == "all":
        children = [ConsumerChild() for _ in range(consumer_processes())]

        async def ready() -> bool:
            return all([await child.ready() for child in children])

        parts.tasks += [child.run for child in children]
        parts.ready = ready
    return parts


def consumer_processes() -> int:
    """``all``: how many consumer children (they split the partitions as one Kafka consumer group)."""
    found = os.environ.get(CONSUMERS_ENV, "").strip()
    count = int(found) if found.isdigit() else 1
    return max(1, min(count, CONSUMER_PROCESSES_MAX))


class ConsumerChild(ChildProcess):
    """``python -m billing_projections.consumer`` as a child process, stopped with this one."""

    started_children = 0  # children of this process so far (each child's metrics port is the next one)

    def __init__(self) -> None:
        super().__init__("consumer", CONSUMER_STOP_SECONDS_MAX)
        self.index = ConsumerChild.started_children
        ConsumerChild.started_children += 1

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "billing_projections.consumer"]
        port = os.environ.get(CONSUMER_PORT_ENV, "").strip()
        return args + (["--port", str(int(port) + self.index)] if port.isdigit() else [])


def builder(role: str) -> Callable[[Settings, Bus], Awaitable[ServiceParts]]:
    """``build`` for one role, in the shape the runner takes."""
    async def build_role(settings: Settings, bus: Bus) -> ServiceParts:
        return await build(settings, bus, role)

    return build_role
