"""The ledger application: applies commands from Kafka exactly once and records every movement.

* One batch of commands (one Kafka partition) is ONE transaction in the event store: the new events of
  every aggregate touched, a ``CommandReceipt`` per command, and the Kafka position as an eventsourcing
  ``Tracking`` record (``kafka:<topic>:<partition>`` -> next offset). The process recorder refuses a
  position that is not greater than the last one: a batch is applied once or not at all.
* A command whose receipt exists is skipped: command ids are derived from their cause, so a second
  delivery of the same cause (a re-published usage event, a retried admin call) changes nothing.
* eventsourcing is synchronous; the service calls this from asyncio through a worker thread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlparse
from uuid import UUID

from billing_events.messages import LedgerCommand
from billing_ledger.domain.account import LedgerError
from billing_ledger.domain.receipt import CommandReceipt
from billing_runtime.logging import get_logger
from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import ProcessRecorder, Tracking

log = get_logger(__name__)


def persistence_env(database_url: str | None, data_dir: str, schema: str = "billing_ledger") -> dict[str, str]:
    """eventsourcing settings: PostgreSQL schema ``billing_ledger`` or ``<data_dir>/ledger-events.sqlite``."""
    if database_url:
        url = urlparse(database_url)
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": (url.path or "/billing").lstrip("/"),
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": url.username or "billing",
            "POSTGRES_PASSWORD": url.password or "",
            "POSTGRES_SCHEMA": schema,
            "POSTGRES_POOL_SIZE": "4",
            "POSTGRES_MAX_OVERFLOW": "4",
            "POSTGRES_LOCK_TIMEOUT": "10",
            "CREATE_TABLE": "y",
        }
    os.makedirs(data_dir, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": os.path.join(data_dir, "ledger-events.sqlite"),
        "SQLITE_LOCK_TIMEOUT": "10",
        "CREATE_TABLE": "y",
    }


@dataclass(frozen=True)
class CommandResult:
    command_id: UUID
    outcome: str  # applied | duplicate | rejected
    reason: str | None = None


CommandHandler = Callable[["LedgerApplication", "_Batch", LedgerCommand], None]
HANDLERS: dict[str, CommandHandler] = {}


def handles(kind: str) -> Callable[[CommandHandler], CommandHandler]:
    """Registers a command handler; handler modules live next to this one (e.g. catalog_commands.py)."""

    def register(handler: CommandHandler) -> CommandHandler:
        assert kind not in HANDLERS, f"two handlers for {kind}"
        HANDLERS[kind] = handler
        return handler

    return register


class CommandRejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


class _Batch:
    """Aggregates loaded once per batch, so many commands for one account share one instance."""

    def __init__(self, app: LedgerApplication, tracking: Tracking | None) -> None:
        self.app = app
        self.processing = ProcessingEvent[UUID](tracking=tracking)
        self.loaded: dict[UUID, Aggregate | None] = {}
        self.receipts: set[UUID] = set()

    def get(self, aggregate_id: UUID) -> Any:
        if aggregate_id not in self.loaded:
            try:
                self.loaded[aggregate_id] = self.app.repository.get(aggregate_id)
            except AggregateNotFoundError:
                self.loaded[aggregate_id] = None
        return self.loaded[aggregate_id]

    def add(self, aggregate: Aggregate) -> None:
        self.loaded[aggregate.id] = aggregate

    def collect(self) -> None:
        self.processing.collect_events(*(a for a in self.loaded.values() if a is not None))


class LedgerApplication(Application[UUID]):
    name = "ledger"

    def construct_recorder(self) -> ProcessRecorder:
        # A process recorder writes Tracking in the same transaction as the events (a plain application
        # recorder would silently ignore it).
        return self.factory.process_recorder()

    @property
    def process_recorder(self) -> ProcessRecorder:
        assert isinstance(self.recorder, ProcessRecorder)
        return self.recorder

    def next_offset(self, topic: str, partition: int) -> int | None:
        return self.process_recorder.max_tracking_id(f"kafka:{topic}:{partition}")

    # -- commands ----------------------------------------------------------------------------------------

    def apply_commands(self, commands: Sequence[LedgerCommand], tracking: Tracking | None = None
                       ) -> list[CommandResult]:
        """Applies commands in order in ONE transaction (with ``tracking`` when they came from Kafka)."""
        batch = _Batch(self, tracking)
        results: list[CommandResult] = []
        for command in commands:
            if command.command_id in batch.receipts or batch.get(command.command_id) is not None:
                results.append(CommandResult(command.command_id, "duplicate"))
                continue
            handler = HANDLERS.get(command.kind)
            outcome, reason = "applied", None
            if handler is None:
                outcome, reason = "rejected", "unknown_command"
            else:
                try:
                    handler(self, batch, command)
                except CommandRejected as exc:
                    outcome, reason = "rejected", exc.reason
                    log.info("command_rejected", kind=command.kind, tenant=command.tenant, reason=exc.reason,
                             detail=str(exc))
                except LedgerError as exc:
                    # Domain checks run before any event is triggered, so the aggregate is unchanged.
                    outcome, reason = "rejected", _snake(type(exc).__name__)
                    log.info("command_rejected", kind=command.kind, tenant=command.tenant, reason=reason,
                             detail=str(exc))
            receipt = CommandReceipt(command_id=command.command_id, kind=command.kind, tenant=command.tenant,
                                     outcome=outcome, reason=reason, issued_by=command.issued_by)
            batch.add(receipt)
            batch.receipts.add(command.command_id)
            results.append(CommandResult(command.command_id, outcome, reason))
        batch.collect()
        self._record(batch.processing)
        return results

def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def jsonable(value: Any) -> Any:
    """Event attributes -> JSON-safe values (UUID/datetime/Decimal as strings)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


# Handler modules register themselves on import (one module per group of command kinds).
from billing_ledger import account_commands, catalog_commands  # noqa: F401
