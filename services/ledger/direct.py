"""Synchronous, strongly consistent decisions for the HTTP routes: one command, one transaction, now.

A hold, an allocation, an adjustment or a refund asked over HTTP is applied directly through the
``LedgerApplication`` of this process (no Kafka position: its receipt is its idempotency), and answered
once it is committed. Correctness comes from optimistic concurrency: the decision is recorded as the next
version of the account (or pool) it was made on, and if another writer recorded that version first (the
Kafka consumer's batch, another request, another ledger process) eventsourcing raises ``IntegrityError``,
nothing was written, and the command is decided again on the reloaded aggregate.

The first attempt trusts this process's aggregate cache without asking the store whether it is current:
the insert of the next version is that question (a stale copy conflicts and is retried on fresh state),
and a command id seen before conflicts on its receipt. Only a refusal, which writes nothing, is decided
again on fresh state before it is answered. So a hold on a busy account costs one transaction, not a
read and a transaction.

Within one process, commands for one aggregate take a striped lock first, so they queue instead of
conflicting; only other processes and the consumer's batches cause retries. Retries are bounded
(``DIRECT_CONFLICT_RETRIES_MAX``) with a short random back-off; exhaustion is reported, never hidden.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.limits import (
    DIRECT_CONFLICT_BACKOFF_SECONDS_MAX,
    DIRECT_CONFLICT_RETRIES_MAX,
    DIRECT_LOCK_STRIPES,
)
from billing_runtime.logging import get_logger
from eventsourcing.persistence import IntegrityError

log = get_logger(__name__)
T = TypeVar("T")


class ConflictsExhausted(Exception):
    """Every attempt lost an optimistic-concurrency race: the caller should retry later."""


class DirectCommands:
    def __init__(self, app: LedgerApplication) -> None:
        self.app = app
        self._locks = [threading.Lock() for _ in range(DIRECT_LOCK_STRIPES)]
        self._rng = random.Random()

    def apply(self, command: LedgerCommand, aggregate_id: UUID) -> CommandResult:
        """Applies ``command`` (which changes ``aggregate_id``) in its own transaction; blocking."""
        lock = self._locks[aggregate_id.int % DIRECT_LOCK_STRIPES]
        trust_cache = True
        for attempt in range(1, DIRECT_CONFLICT_RETRIES_MAX + 1):
            with lock:
                try:
                    [result] = self.app.apply_commands([command], record_rejections=False, trust_cache=trust_cache)
                except IntegrityError:
                    log.debug("direct_command_conflict", kind=command.kind, tenant=command.tenant, attempt=attempt)
                else:
                    if result.outcome != "rejected" or not trust_cache:
                        return result
                    # A refusal writes nothing, so nothing proved the cached state current: decide again on
                    # the stored state before saying no.
                    trust_cache = False
                    continue
            trust_cache = False
            time.sleep(self._rng.uniform(0, DIRECT_CONFLICT_BACKOFF_SECONDS_MAX))
        raise ConflictsExhausted(f"{command.kind} for {command.tenant}: {DIRECT_CONFLICT_RETRIES_MAX} conflicts")

    async def decide(self, command: LedgerCommand, aggregate_id: UUID) -> CommandResult:
        return await asyncio.to_thread(self.apply, command, aggregate_id)

    async def read(self, aggregate_id: UUID, view: Callable[[Any], T]) -> T | None:
        """``view`` of the current state of ``aggregate_id`` (see ``LedgerApplication.read``)."""
        return await asyncio.to_thread(self.app.read, aggregate_id, view)
