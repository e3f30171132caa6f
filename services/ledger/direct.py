"""Synchronous, strongly consistent decisions for the HTTP routes: decided now, answered once committed.

A hold, an allocation, an adjustment or a refund asked over HTTP is applied directly through the
``LedgerApplication`` of this process (no Kafka position: its receipt is its idempotency). Correctness comes
from optimistic concurrency: each decision is recorded as the next version of the account (or pool) it was
made on, and if another writer recorded that version first (the Kafka consumer's batch, another ledger
process) eventsourcing raises ``IntegrityError``, nothing was written, and the commands are decided again
on the reloaded aggregates.

**Group commit.** eventsourcing's PostgreSQL recorder locks the event table for every insert transaction,
so one transaction per request caps a process at roughly one decision per commit latency. Instead one
writer thread takes every request waiting (at most ``DIRECT_GROUP_COMMANDS_MAX``) and applies them as one
transaction, in arrival order: alone when the ledger is quiet, together under load. Each request still
gets its own result, exactly as if it had been applied alone at that point in the order.

**Inline when idle** (see ``DirectCommands.decide``): when nothing is being decided or waiting, the command is
decided and committed on the caller's (the event loop's) thread instead, without a thread hand-over.

**Trusting the cache.** The first attempt uses this process's in-memory aggregates without asking the
store whether they are current: the insert of the next version is that question (a stale copy conflicts),
and a command id seen before conflicts on its receipt. Only refusals, which write nothing, are decided
again on fresh state before they are answered.

**After a conflict** the group is decided again on the stored state *under the locks of its accounts*
(``apply_commands(exclusive=True)``, see :mod:`billing_ledger.pg_recorder`): no other writer can record an
event of those accounts meanwhile, so that attempt cannot lose another race on them, and a hold's latency is
bounded by one wait for a decision on the same account (a contended usage transaction's) instead of an
open-ended series of retries with back-off; writers of other accounts do not wait for it. For
``CONTENTION_WINDOW_SECONDS`` after a conflict, or after such a decision found its accounts changed by
another writer (:mod:`billing_ledger.contention`), groups go that way directly: another writer (the Kafka
consumer, another ledger process) is changing the accounts asked about, and a stale copy would cost a
failed insert and a replay of the account first. Where the recorder cannot lock first (SQLite, embedded),
conflicts are retried on fresh state (``DIRECT_CONFLICT_RETRIES_MAX``; the first retry at once, later ones
after a short random back-off); exhaustion is reported to the caller (``ConflictsExhausted``), never hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication, NotInMemory
from billing_ledger.contention import Contention, backoff_seconds
from billing_ledger.limits import (
    DIRECT_CONFLICT_RETRIES_MAX,
    DIRECT_GROUP_COMMANDS_MAX,
    DIRECT_INLINE_IDLE_SECONDS,
    DIRECT_INLINE_PAUSE_SECONDS,
    DIRECT_INLINE_SLOW_SECONDS,
    DIRECT_QUEUE_COMMANDS_MAX,
)
from billing_runtime.logging import get_logger
from eventsourcing.persistence import IntegrityError

log = get_logger(__name__)
T = TypeVar("T")


class ConflictsExhausted(Exception):
    """Every attempt lost an optimistic-concurrency race: the caller should retry later."""


class Overloaded(Exception):
    """More decisions are waiting than ``DIRECT_QUEUE_COMMANDS_MAX``: the caller should retry later."""


@dataclass
class _Waiting:
    command: LedgerCommand
    loop: asyncio.AbstractEventLoop
    answer: asyncio.Future[CommandResult]
    fresh: bool = False  # decide on the stored state (a first attempt on the event loop refused or conflicted)


class DirectCommands:
    def __init__(self, app: LedgerApplication, group_commands_max: int = DIRECT_GROUP_COMMANDS_MAX,
                 inline: bool | None = None) -> None:
        assert group_commands_max >= 1
        self.app = app
        self.group_commands_max = group_commands_max  # 1: every request its own transaction
        # Decide on the event loop's thread when idle (see decide); by default where a commit is one round trip.
        self.inline = app.can_decide_exclusively if inline is None else inline
        self._rng = random.Random()
        self.contention = Contention()
        self._queue: queue.Queue[_Waiting] = queue.Queue(maxsize=DIRECT_QUEUE_COMMANDS_MAX)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()
        # Held by whoever is deciding (the writer thread for a group, the event loop for an inline decision).
        self._deciding = threading.Lock()
        self._finished_at = 0.0  # monotonic time the last decision finished
        self._inline_after = 0.0  # no inline decisions before this monotonic time (one was slow)
        self.inline_decisions = 0

    # -- the blocking core -----------------------------------------------------------------------------------

    def apply_group(self, commands: Sequence[LedgerCommand]) -> list[CommandResult]:
        """Applies ``commands`` in order as one transaction (decided again after a conflict); blocking."""
        if not self.contention.recent(time.monotonic()):
            try:
                results = self.app.apply_commands(commands, record_rejections=False, trust_cache=True)
            except IntegrityError:
                log.debug("direct_commands_conflict", commands=len(commands), attempt=1)
                self.contention.conflicted(time.monotonic())
            else:
                refused = [i for i, r in enumerate(results) if r.outcome == "rejected"]
                if refused:
                    # A refusal writes nothing, so nothing proved the cached state current: decide those again
                    # on the stored state before saying no (after the others, which are committed now).
                    again = self.apply_group_fresh([commands[i] for i in refused])
                    for i, result in zip(refused, again, strict=True):
                        results[i] = result
                return results
        return self.apply_group_fresh(commands)

    def apply_group_fresh(self, commands: Sequence[LedgerCommand]) -> list[CommandResult]:
        """``commands`` decided on the stored state: under locks where the recorder can (PostgreSQL: no other
        writer can record their accounts first, so the first attempt stands), else retried."""
        for attempt in range(1, DIRECT_CONFLICT_RETRIES_MAX + 1):
            try:
                return self.app.apply_commands(commands, record_rejections=False, exclusive=True,
                                               contention=self.contention)
            except IntegrityError:
                log.debug("direct_commands_conflict", commands=len(commands), attempt=attempt, fresh=True)
                time.sleep(backoff_seconds(attempt, self._rng))
        raise ConflictsExhausted(f"{len(commands)} commands: {DIRECT_CONFLICT_RETRIES_MAX} conflicts in a row")

    def apply(self, command: LedgerCommand, aggregate_id: UUID | None = None) -> CommandResult:
        """One command in its own transaction; blocking (``aggregate_id`` is accepted for symmetry)."""
        return self.apply_group([command])[0]

    # -- the writer thread -----------------------------------------------------------------------------------

    async def decide(self, command: LedgerCommand, aggregate_id: UUID | None = None) -> CommandResult:
        """``command``'s committed result: decided right here when the ledger is idle, else by the writer thread.

        **Inline when idle.** Handing a request to the writer thread and its answer back costs two thread
        wake-ups and GIL hand-overs, each a chance to wait for a core on a busy machine, for the sake of a
        group commit that a quiet ledger does not need. So when nothing is being decided or waiting, no
        decision finished in the last ``DIRECT_INLINE_IDLE_SECONDS``, no conflict is recent and the accounts
        are in memory, the command is decided and committed on this (the event loop's) thread: CPU only,
        plus one round trip (lock, insert and commit pipelined, see ``pg_recorder``), blocking the loop for
        about a commit's latency, as the writer would have made the request wait anyway. A request that
        arrives meanwhile finds the last decision just finished and goes to the writer, so under load
        requests group as before. An inline attempt that refuses or conflicts is handed to the writer to
        be decided on the stored state, as a group's would be; one slower than
        ``DIRECT_INLINE_SLOW_SECONDS`` (a busy database) stops inline decisions for
        ``DIRECT_INLINE_PAUSE_SECONDS``. The inline attempt uses the cached accounts only: one that another
        thread took between the check and the attempt (the sweeper, a group) is not loaded from the store on this
        thread (which would stop every request meanwhile); the command goes to the writer, which waits its turn.
        """
        if self._may_decide_inline(command, aggregate_id) and self._deciding.acquire(blocking=False):
            try:
                result = self._decide_inline(command)
            except NotInMemory:  # taken by another thread since _may_decide_inline looked: its turn is the writer's
                return await self._hand_over(command, fresh=False)
            if result is not None:
                return result
            return await self._hand_over(command, fresh=True)
        return await self._hand_over(command, fresh=False)

    def _may_decide_inline(self, command: LedgerCommand, aggregate_id: UUID | None) -> bool:
        if not self.inline or not self._queue.empty():
            return False
        now = time.monotonic()
        if (now < self._inline_after or now - self._finished_at < DIRECT_INLINE_IDLE_SECONDS
                or self.contention.recent(now)):
            return False
        cache = self.app.cache
        return ((aggregate_id is None or aggregate_id in cache)
                and (not command.tenant or ids.account_id(command.tenant) in cache))

    def _decide_inline(self, command: LedgerCommand) -> CommandResult | None:
        """The first attempt on this thread (trusting the cache), ``_deciding`` held by the caller and released
        here; None: to be decided again on the stored state. Raises ``NotInMemory`` (nothing read or decided)
        when an account is no longer cached here."""
        started = time.monotonic()
        try:
            # Memory only: an account another thread took meanwhile is not replayed from the store on this thread.
            result = self.app.apply_commands([command], record_rejections=False, trust_cache=True,
                                             memory_only=True)[0]
        except IntegrityError:
            log.debug("direct_commands_conflict", commands=1, attempt=1, inline=True)
            self.contention.conflicted(time.monotonic())
            return None
        finally:
            self._finished_at = time.monotonic()
            if self._finished_at - started > DIRECT_INLINE_SLOW_SECONDS:
                self._inline_after = self._finished_at + DIRECT_INLINE_PAUSE_SECONDS
            self._deciding.release()
        if result.outcome == "rejected":
            return None  # a refusal wrote nothing, so nothing proved the cached state current
        self.inline_decisions += 1
        return result

    async def _hand_over(self, command: LedgerCommand, fresh: bool) -> CommandResult:
        """Queues ``command`` for the writer thread and waits for its committed result."""
        self._ensure_writer()
        loop = asyncio.get_running_loop()
        waiting = _Waiting(command, loop, loop.create_future(), fresh)
        try:
            self._queue.put_nowait(waiting)
        except queue.Full as exc:
            raise Overloaded(f"{DIRECT_QUEUE_COMMANDS_MAX} decisions are already waiting") from exc
        return await waiting.answer

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write, name="ledger-direct-writer", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self.group_commands_max:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            fresh = any(w.fresh for w in group)
            with self._deciding:
                try:
                    results = self._results([w.command for w in group], fresh)
                finally:
                    self._finished_at = time.monotonic()
            for waiting, result in zip(group, results, strict=True):
                with contextlib.suppress(RuntimeError):  # the caller's event loop is gone
                    waiting.loop.call_soon_threadsafe(_settle, waiting.answer, result)

    def _results(self, commands: list[LedgerCommand], fresh: bool = False) -> list[Any]:
        try:
            return self.apply_group_fresh(commands) if fresh else self.apply_group(commands)
        except Exception as exc:  # noqa: BLE001 - every waiting caller must hear about it
            if len(commands) == 1:
                return [exc]
            # One bad command must not fail the others: apply them one by one.
            return [self._results([command], fresh)[0] for command in commands]

    async def read(self, aggregate_id: UUID, view: Callable[[Any], T]) -> T | None:
        """``view`` of the current state of ``aggregate_id`` (see ``LedgerApplication.read``)."""
        return await asyncio.to_thread(self.app.read, aggregate_id, view)


def _settle(answer: asyncio.Future[CommandResult], result: CommandResult | BaseException) -> None:
    if answer.done():  # the caller went away (client disconnected)
        return
    if isinstance(result, BaseException):
        answer.set_exception(result)
    else:
        answer.set_result(result)
