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

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlparse
from uuid import UUID

import orjson
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.aggregate_cache import AggregateCache
from billing_ledger.bulk_reads import PostgresEventReader, event_reader
from billing_ledger.contention import Contention
from billing_ledger.domain.account import LedgerError
from billing_ledger.domain.allocation import AllocationError
from billing_ledger.domain.chain import APPLY_FAILED
from billing_ledger.domain.invoice import InvoiceError
from billing_ledger.domain.receipt import RECORDED_TOPIC as RECEIPT_RECORDED_TOPIC
from billing_ledger.domain.receipt import CommandReceipt
from billing_ledger.domain.roster import RosterError
from billing_ledger.domain.subscription import SubscriptionError
from billing_ledger.limits import (
    AGGREGATE_CACHE_AGGREGATES_MAX,
    AGGREGATE_RETURN_WAIT_SECONDS,
    CHUNK_COMMANDS_MAX,
    CONTENDED_CHUNK_COMMANDS_MAX,
    FOLLOWER_POSITION_RECORD_SECONDS,
    WAITING_COMMANDS_MAX,
)
from billing_ledger.pg_recorder import BinaryArrayProcessRecorder
from billing_ledger.snapshots import Snapshots
from billing_ledger.transcoder import OrjsonTranscoder, encode_plain_state
from billing_runtime.logging import get_logger
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, ProcessRecorder, StoredEvent, Tracking, Transcoder
from eventsourcing.utils import get_topic, strtobool

log = get_logger(__name__)
T = TypeVar("T")


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
            "PROCESS_RECORDER_TOPIC": "billing_ledger.pg_recorder:BinaryArrayProcessRecorder",
            "POSTGRES_POOL_SIZE": "4",
            "POSTGRES_MAX_OVERFLOW": "4",
            "POSTGRES_LOCK_TIMEOUT": "10",
            "CREATE_TABLE": "y",
            "IS_SNAPSHOTTING_ENABLED": "y",  # see snapshots.py
        }
    os.makedirs(data_dir, exist_ok=True)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": os.path.join(data_dir, "ledger-events.sqlite"),
        "SQLITE_LOCK_TIMEOUT": "10",
        "CREATE_TABLE": "y",
        "IS_SNAPSHOTTING_ENABLED": "y",
    }


@contextlib.contextmanager
def setting_up(env: Mapping[str, str] | None) -> Iterator[None]:
    """Serialises the set-up of a PostgreSQL store (its tables, types, functions and the snapshot table, made
    by eventsourcing and ``pg_recorder`` when ``CREATE_TABLE``) among the processes starting on it at once.

    PostgreSQL's DDL is not safe to run concurrently: ledger processes started together on a new schema
    failed with ``duplicate key value violates unique constraint "pg_type_typname_nsp_index"`` (two
    ``CREATE TABLE IF NOT EXISTS`` of one table), and on an existing one ``CREATE OR REPLACE FUNCTION`` can
    fail with "tuple concurrently updated". A session advisory lock per schema, on a connection of its own,
    is held while the application sets its store up; the next process then finds everything there."""
    if not env or env.get("PERSISTENCE_MODULE") != "eventsourcing.postgres" or \
            not strtobool(env.get("CREATE_TABLE", "y")):  # as eventsourcing reads it
        yield
        return
    import psycopg

    with psycopg.connect(host=env.get("POSTGRES_HOST"), port=env.get("POSTGRES_PORT"), dbname=env.get("POSTGRES_DBNAME"),
                         user=env.get("POSTGRES_USER"), password=env.get("POSTGRES_PASSWORD"),
                         autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(hashtext('billing ledger set-up'), hashtext(%s))",
                     (env.get("POSTGRES_SCHEMA", ""),))
        yield  # the lock ends with the connection


@dataclass(frozen=True)
class CommandResult:
    command_id: UUID
    outcome: str  # applied | duplicate | rejected
    reason: str | None = None
    # What the handler returned (e.g. the hold it placed); None for duplicates and rejections.
    value: Any = None
    # For a duplicate: the outcome recorded the first time (its receipt), so a retry gets the same answer.
    first_outcome: str | None = None
    # Why a command was rejected, in words (not recorded: the receipt keeps the reason code).
    detail: str | None = None


CommandHandler = Callable[["LedgerApplication", "_Batch", LedgerCommand], Any]
# Records a rejected command of a kind somewhere a reconciliation finds it by its tenant (the receipt is keyed by the
# command's id alone), in the batch that records the receipt: (batch, command, reason code, detail).
RejectionRecorder = Callable[["_Batch", LedgerCommand, str | None, str | None], None]
# Events read ahead for a batch's first load: ({aggregate id: version read from}, {aggregate id: events after it}).
_Known = tuple[Mapping[UUID, int], Mapping[UUID, list[StoredEvent]]]
HANDLERS: dict[str, CommandHandler] = {}
REJECTION_RECORDERS: dict[str, RejectionRecorder] = {}
# Kinds whose rejections keep the command on the receipt (``handles(kind, keep_rejected=True)``).
KEPT_WHEN_REJECTED: set[str] = set()
# Per event class: its topic, or "" when its state is not exactly its attributes (``_to_stored_events``).
_TOPICS: dict[type, str] = {}


def handles(kind: str, *, keep_rejected: bool = False) -> Callable[[CommandHandler], CommandHandler]:
    """Registers a command handler; handler modules live next to this one (e.g. catalog_commands.py).

    ``keep_rejected``: a rejection of this kind keeps the command and the rejection's detail on its receipt
    (``CommandReceipt.RejectedCommandKept``), for commands that report money moved elsewhere (a gateway refund): a
    person reconciles each, so it must be found and named later, not just counted."""

    def register(handler: CommandHandler) -> CommandHandler:
        assert kind not in HANDLERS, f"two handlers for {kind}"
        HANDLERS[kind] = handler
        if keep_rejected:
            KEPT_WHEN_REJECTED.add(kind)
        return handler

    return register


def records_rejections(*kinds: str) -> Callable[[RejectionRecorder], RejectionRecorder]:
    """Registers what records a rejection of these command kinds besides its receipt (``dispute_commands``: the
    tenant's ``DisputeRejections``, which ``billing reconcile disputes`` reads instead of every receipt)."""

    def register(recorder: RejectionRecorder) -> RejectionRecorder:
        for kind in kinds:
            assert kind not in REJECTION_RECORDERS, f"two rejection recorders for {kind}"
            REJECTION_RECORDERS[kind] = recorder
        return recorder

    return register


class NotInMemory(Exception):
    """A decision asked to use this process's aggregates only (``memory_only``) needs one that is not cached
    here now, or that another thread is deciding on: nothing was read from the store nor decided."""


class CommandRejected(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail or reason


class _Batch:
    """The aggregates of one transaction: loaded once (in bulk), shared by every command of the batch."""

    def __init__(self, app: LedgerApplication, tracking: Tracking | None, after: _Batch | None = None) -> None:
        self.app = app
        self.processing = ProcessingEvent[UUID](tracking=tracking)
        self.loaded: dict[UUID, Aggregate | None] = {}
        self.receipts: set[UUID] = set()  # receipts recorded by this batch
        # The batch before this one when they are pipelined (apply_chunks): it may still be committing, so
        # its aggregates are taken over from it, not read from the store, and its receipts count too.
        self.after = after
        self.committing: Future[None] | None = None
        self.results: list[CommandResult] = []
        self.stored: list[StoredEvent] = []
        self.trust_cache = False  # see LedgerApplication.load_many
        self.memory_only = False  # likewise
        self.known: _Known | None = None  # events already read for the first load (see load_many)
        self.now = datetime.now(UTC)  # when this batch's receipts were recorded
        self.now_tagged = {"_type_": "datetime_iso", "_data_": self.now.isoformat()}  # as the transcoder tags it
        self.stored_receipts: list[StoredEvent] = []  # encoded directly (see LedgerApplication._record_receipt)
        # Pending-event counts of the aggregates the current command touched, when it first touched them.
        self.touched: dict[UUID, int] = {}
        # When the current command was issued (``LedgerCommand.issued_at``): the day a document it finalizes is
        # issued, whatever earlier time the command takes effect at (``subscription_commands._finalize``).
        self.command_issued_at: datetime | None = None

    def prefetch(self, aggregate_ids: Iterable[UUID], receipt_ids: Iterable[UUID]) -> None:
        wanted = [i for i in aggregate_ids if i not in self.loaded and not self._take_from_previous(i)]
        self.loaded.update(self.app.load_many(wanted, receipt_ids, trust_cache=self.trust_cache, known=self.known,
                                              memory_only=self.memory_only))

    def _take_from_previous(self, aggregate_id: UUID) -> bool:
        if self.after is None or self.after.loaded.get(aggregate_id) is None:
            return False
        aggregate = self.after.loaded.pop(aggregate_id)
        if isinstance(aggregate, CommandReceipt):
            self.after.loaded[aggregate_id] = aggregate
            return False
        self.loaded[aggregate_id] = aggregate
        return True

    def is_duplicate(self, command_id: UUID) -> bool:
        return (command_id in self.receipts or self.loaded.get(command_id) is not None
                or (self.after is not None and command_id in self.after.receipts))

    def wait_for_previous(self) -> None:
        """Blocks until the previous pipelined batch is durable (raises if its commit failed)."""
        if self.after is not None and self.after.committing is not None:
            self.after.committing.result()

    def get(self, aggregate_id: UUID) -> Any:
        if aggregate_id not in self.loaded and not self._take_from_previous(aggregate_id):
            self.loaded.update(self.app.load_many([aggregate_id], (), trust_cache=self.trust_cache,
                                                  memory_only=self.memory_only))
        aggregate = self.loaded[aggregate_id]
        if aggregate is not None and aggregate_id not in self.touched:
            self.touched[aggregate_id] = len(aggregate.pending_events)
        return aggregate

    def existing(self, aggregate_id: UUID, reason: str, detail: str) -> Any:
        """The aggregate, or the command is rejected with ``reason`` (nothing changed)."""
        aggregate = self.get(aggregate_id)
        if aggregate is None:
            raise CommandRejected(reason, detail)
        return aggregate

    def get_or_create(self, aggregate_id: UUID, create: Callable[[], Aggregate]) -> Any:
        """The aggregate, or a new one from ``create()`` added to this batch."""
        aggregate = self.get(aggregate_id)
        if aggregate is None:
            aggregate = create()
            self.add(aggregate)
        return aggregate

    def add(self, aggregate: Aggregate) -> None:
        self.loaded[aggregate.id] = aggregate
        self.touched.setdefault(aggregate.id, 0)

    def begin_command(self, command: LedgerCommand) -> None:
        self.touched = {}
        self.command_issued_at = command.issued_at

    def rollback(self) -> None:
        """Undoes what the current command did to the batch's aggregates (it was rejected half-way).

        Each touched aggregate is rebuilt from its stored state plus the events earlier commands of this
        batch left pending; aggregates the command created are dropped. Only rejections pay for this.
        """
        self.wait_for_previous()  # the stored state must include the previous pipelined batch
        for aggregate_id, mark in self.touched.items():
            aggregate = self.loaded.get(aggregate_id)
            if aggregate is None or (len(aggregate.pending_events) == mark and not _apply_failed(aggregate)):
                continue
            keep = list(aggregate.pending_events[:mark])
            stored_version = aggregate.version - len(aggregate.pending_events)
            rebuilt = self.app.load_many([aggregate_id])[aggregate_id] if stored_version > 0 else None
            for pending in keep:
                rebuilt = pending.mutate(rebuilt)
            if rebuilt is not None:
                rebuilt._pending_events = keep
            self.loaded[aggregate_id] = rebuilt
        self.touched = {}

    def command_changed_something(self) -> bool:
        return any(len(a.pending_events) != n or _apply_failed(a)
                   for a, n in ((self.loaded[i], n) for i, n in self.touched.items()) if a is not None)

    def collect(self) -> None:
        # ProcessingEvent.collect_events() checks every object against a runtime Protocol, which costs more
        # than the rest of a usage debit; these are all aggregates, so collect directly (after the receipts,
        # which are already events).
        for aggregate in self.loaded.values():
            if aggregate is not None and aggregate.pending_events:
                self.processing.events.extend(aggregate.collect_events())
                self.processing.aggregates[aggregate.id] = aggregate

    def return_to_cache(self) -> None:
        """After the commit: the batch's aggregates go back to the cache (snapshotted first when due)."""
        aggregates = [a for a in self.loaded.values() if a is not None and not isinstance(a, CommandReceipt)]
        if self.app.snapshotter is not None:
            self.app.snapshotter.take_due(aggregates)
        for aggregate in aggregates:
            self.app.cache.put(aggregate)
        self.app.cache.release([i for i, a in self.loaded.items() if a is None])


class LedgerApplication(Application[UUID]):
    name = "ledger"

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        register_handlers()
        with setting_up(env):
            super().__init__(env)
        self.cache = AggregateCache(AGGREGATE_CACHE_AGGREGATES_MAX)
        self.reader = event_reader(self.recorder)
        self.snapshotter = Snapshots(self, self.snapshots) if self.snapshots is not None else None
        self.contention = Contention()  # of the batch path (apply_chunks)
        self._commit_executor: ThreadPoolExecutor | None = None
        # Set on a thread while it decides holding PostgreSQL locks (_apply_locked): it never waits for an
        # aggregate another thread has out, as that thread may be waiting for those locks (a deadlock until
        # the wait's timeout: a sweep under its account's lock waiting for a hold whose insert waits for it).
        self._under_locks = threading.local()
        # Set on a thread while it runs pipelined batches (apply_chunks), which pass an aggregate on from batch
        # to batch for as long as the poll lasts: nobody waits for what it takes (aggregate_cache.py).
        self._pipelining = threading.local()
        # follower -> (the log position it has scanned to finding none of its topics, when that was last recorded)
        self._scanned: dict[str, tuple[int, float]] = {}
        # Commands waiting for one on another partition (a grant for its catalogue): when this process first tried
        # each (``waited_seconds``), oldest first.
        self._first_tries: dict[UUID, float] = {}
        self._first_tries_lock = threading.Lock()

    def waited_seconds(self, command_id: UUID) -> float:
        """Seconds since this process first tried ``command_id``, a command that waits (its batch fails, the consumer
        hands it again later) for another one on another partition: 0 the first time. At most
        ``WAITING_COMMANDS_MAX`` are remembered, the oldest forgotten first (its wait then starts again)."""
        now = time.monotonic()
        with self._first_tries_lock:
            first = self._first_tries.setdefault(command_id, now)
            while len(self._first_tries) > WAITING_COMMANDS_MAX:
                del self._first_tries[next(iter(self._first_tries))]
        return now - first

    def construct_transcoder(self) -> Transcoder:
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

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

    # -- followers of the event log (relay, alerts, top-ups, invoice emails) --------------------------------

    def unprocessed(self, follower: str, limit: int, topics: Sequence[str] = (), after: int | None = None
                    ) -> Sequence[Any]:
        """The stored events (notifications) after ``follower``'s tracked position (or ``after``, a position
        the follower keeps itself), oldest first, at most ``limit``, only of ``topics`` if given. The follower
        acts on them, then calls ``processed``."""
        recorder = self.process_recorder
        if after is not None or not topics:
            position = after if after is not None else (recorder.max_tracking_id(follower) or 0)
            return recorder.select_notifications(position + 1, limit, topics=topics)
        # Events of a few topics (a top-up request, an alert): the tracked position is the last one acted on, and
        # scanning from there read every event recorded since (each hold, each debit) on every round, for as long as
        # none of the topics came: rounds of 100-150 ms on a bench store, growing with the log. So where a scan
        # found none, the follower goes on from the end of what it scanned (kept here, and recorded now and then).
        tracked = recorder.max_tracking_id(follower) or 0
        scanned, recorded_at = self._scanned.get(follower, (0, 0.0))
        found, scanned_to = self.scan_notifications(max(tracked, scanned), limit, topics)
        if found:
            return found
        now = time.monotonic()
        if scanned_to > tracked and now - recorded_at >= FOLLOWER_POSITION_RECORD_SECONDS:
            with contextlib.suppress(IntegrityError):  # another process recorded this very position
                recorder.insert_tracking(Tracking(follower, scanned_to))
            recorded_at = now
        self._scanned[follower] = (scanned_to, recorded_at)
        return found

    def scan_notifications(self, position: int, limit: int, topics: Sequence[str]) -> tuple[Sequence[Any], int]:
        """At most ``limit`` stored events of ``topics`` after ``position``, oldest first, and where to scan from
        next: after the last one when the page is full, else after the last event recorded when the scan began,
        as none of ``topics`` is up to there and none will be (inserts commit in the order of their positions,
        pg_recorder.py). A follower that went on from the last event it found instead read every event recorded
        since, on every round, until one of its topics came."""
        recorder = self.process_recorder
        last = recorder.max_notification_id() or 0
        if last <= position:
            return [], position
        found = recorder.select_notifications(position + 1, limit, stop=last, topics=topics)
        return found, (found[-1].id if len(found) >= limit else last)

    def processed(self, follower: str, notification_id: int) -> None:
        """Records that ``follower`` is done up to ``notification_id`` (its next ``unprocessed`` starts after)."""
        self.process_recorder.insert_tracking(Tracking(follower, notification_id))

    # -- reading -----------------------------------------------------------------------------------------

    def load_many(self, aggregate_ids: Iterable[UUID], receipt_ids: Iterable[UUID] = (), *,
                  trust_cache: bool = False, known: _Known | None = None, memory_only: bool = False
                  ) -> dict[UUID, Any | None]:
        """Current state of many aggregates in one query: cached ones are taken out and brought up to date,
        the others replayed. Receipts are never cached. The caller owns what it gets (see AggregateCache).

        ``trust_cache`` skips the query for cached aggregates and receipts: only for a transaction that
        records a new version of each aggregate it decides on, so a stale copy fails at the insert
        (IntegrityError) instead of deciding wrongly, and a repeated command id fails on its receipt.
        ``known`` = ({id: version}, {id: events after it}): read already (with the decision's locks, see
        ``_apply_exclusively``); used for every id taken at exactly that version, the others are queried.
        ``memory_only`` (with ``trust_cache``): raises ``NotInMemory``, having read nothing, when an aggregate is
        not cached or another thread has it out (an attempt on an event loop's thread, which must not wait for
        the store: see ``direct.DirectCommands.decide``).
        """
        # Waits for an aggregate another thread has out (aggregate_cache.py), except on an event loop's thread
        # (it would stop every request) and under PostgreSQL locks (see _under_locks).
        waits = asyncio._get_running_loop() is None and not getattr(self._under_locks, "active", False)
        wait = AGGREGATE_RETURN_WAIT_SECONDS if waits else 0.0
        briefly = not getattr(self._pipelining, "active", False)
        taken: dict[UUID, Any | None] = {i: self.cache.take(i, wait, briefly=briefly) for i in aggregate_ids}
        cached = {i for i, a in taken.items() if a is not None}
        if memory_only and len(cached) < len(taken):
            self.give_back(taken)
            raise NotInMemory(f"{len(taken) - len(cached)} of {len(taken)} aggregates are not in memory")
        if self.snapshotter is not None and len(cached) < len(taken):
            try:  # the others start from their latest snapshot, if any (snapshots.py)
                taken.update(self.snapshotter.restore([i for i in taken if i not in cached]))
            except BaseException:
                self.give_back(taken)
                raise
        receipts = [i for i in receipt_ids if i not in taken]
        taken.update({i: None for i in receipts})
        versions = {i: (a.version if a is not None else 0) for i, a in taken.items()}
        if trust_cache:
            versions = {i: v for i, v in versions.items() if i not in cached and i not in receipts}
        stored: dict[UUID, list[StoredEvent]] = {}
        if known is not None:
            read_versions, read_events = known
            for i in [i for i, v in versions.items() if read_versions.get(i) == v]:
                del versions[i]
                stored[i] = read_events.get(i, [])
        if versions:
            try:
                stored.update(self.reader.events_after(versions))
            except BaseException:
                self.give_back(taken)
                raise
        for aggregate_id, events in stored.items():
            taken[aggregate_id] = self._mutated(taken[aggregate_id], events)
        return taken

    def _mutated(self, aggregate: Any | None, events: Iterable[StoredEvent]) -> Any | None:
        for event in events:
            aggregate = self.mapper.to_domain_event(event).mutate(aggregate)
        return aggregate

    def read(self, aggregate_id: UUID, view: Callable[[Any], T]) -> T | None:
        """``view(aggregate)`` of the current state of one aggregate (None if it does not exist).

        The view is computed before the aggregate goes back to the cache, where another thread may take
        it and change it: return copies, never the aggregate or its internals.
        """
        aggregate = self.load_many([aggregate_id])[aggregate_id]
        if aggregate is None:
            self.cache.release([aggregate_id])
            return None
        try:
            return view(aggregate)
        finally:
            self.cache.put(aggregate)

    def give_back(self, aggregates: Mapping[UUID, Any | None]) -> None:
        """Aggregates from ``load_many`` that were not changed: back to the cache (the others are released)."""
        dropped = []
        for aggregate_id, aggregate in aggregates.items():
            if aggregate is not None and not aggregate.pending_events and not isinstance(aggregate, CommandReceipt):
                self.cache.put(aggregate)
            else:
                dropped.append(aggregate_id)
        self.cache.release(dropped)

    # -- commands ----------------------------------------------------------------------------------------

    def apply_commands(self, commands: Sequence[LedgerCommand], tracking: Tracking | None = None, *,
                       record_rejections: bool = True, trust_cache: bool = False, memory_only: bool = False,
                       exclusive: bool = False, contention: Contention | None = None) -> list[CommandResult]:
        """Applies commands in order in ONE transaction (with ``tracking`` when they came from Kafka).

        A command whose id has a receipt is a duplicate. Every other command gets a receipt with its outcome,
        except rejections when ``record_rejections`` is false (direct HTTP calls: the caller is told and
        may retry with the same id once the cause is fixed). Raises eventsourcing's ``IntegrityError`` when
        another writer recorded one of the aggregates first: nothing was written, the caller retries.
        ``trust_cache``, ``memory_only``: see ``load_many`` (direct commands, whose caller retries without them).
        ``exclusive``: read and decide while holding locks, so no other writer can record first
        (``IntegrityError`` then only for a tracking position already recorded, see ``_apply_exclusively``);
        for writers that recently lost a race. Ignored where the recorder cannot (SQLite). ``contention``
        (with ``exclusive``): marked ``conflicted`` when the state read under the locks shows that another
        writer changed the commands' accounts since they were cached, so an optimistic write would have lost:
        the contention lasts as long as the other writer does, not just ``window_seconds`` after a conflict.
        """
        try:
            if exclusive and self.can_decide_exclusively:
                return self._apply_exclusively(commands, tracking, record_rejections, contention)
            batch = self._prepare(commands, tracking, record_rejections, trust_cache=trust_cache,
                                  memory_only=memory_only)
            self._commit(batch)
        except BaseException:
            self.cache.release_mine()  # the batch's aggregates are dropped: nobody waits for them
            raise
        batch.return_to_cache()
        return batch.results

    def chunk_commands_max(self) -> int:
        """Commands per transaction for ``apply_chunks`` now: fewer while contended (see limits.py)."""
        if self.can_decide_exclusively and self.contention.recent(time.monotonic()):
            return CONTENDED_CHUNK_COMMANDS_MAX
        return CHUNK_COMMANDS_MAX

    @property
    def can_decide_exclusively(self) -> bool:
        """Whether the recorder can lock the event table before a decision (PostgreSQL, see pg_recorder)."""
        return isinstance(self.recorder, BinaryArrayProcessRecorder)

    def _apply_exclusively(self, commands: Sequence[LedgerCommand], tracking: Tracking | None,
                           record_rejections: bool, contention: Contention | None = None) -> list[CommandResult]:
        """``apply_commands`` deciding under locks, so that no other writer can record first (see pg_recorder).

        First under the locks of the commands' accounts only: writers of other accounts go on while this one
        reads and decides, and the table's insert lock is taken just for the insert and the commit (one round
        trip). That can still lose a race on an aggregate the commands touch that is not their account (a
        pool, an invoice) or on a receipt (the same command applied elsewhere at the same moment): then once
        more under the event table's lock, which cannot lose. A tracking position already recorded fails both
        ways and is raised (``IntegrityError``).
        """
        accounts = sorted({ids.account_id(c.tenant) for c in commands if c.tenant})
        try:
            results, stale = self._apply_locked(commands, tracking, record_rejections, accounts)
        except IntegrityError:
            self.cache.release_mine()
            log.debug("locked_decision_conflict_retried_under_table_lock", commands=len(commands))
            results, stale = self._apply_locked(commands, tracking, record_rejections, None)
        if stale and contention is not None:
            contention.conflicted(time.monotonic())
        return results

    def _apply_locked(self, commands: Sequence[LedgerCommand], tracking: Tracking | None, record_rejections: bool,
                      locked: Sequence[UUID] | None) -> tuple[list[CommandResult], bool]:
        """One decision under the locks of ``locked`` (None: the event table's lock); its results, and whether
        another writer had changed a cached account (the events read under the locks include some of it)."""
        # Own the accounts in this process first, outside the locks (aggregate_cache.py: this waits for another
        # thread deciding on one, never the other way round): as cached, or replayed if not (which can take
        # long for a busy account, so not under the locks); under the locks only the events recorded since
        # their versions are read. Waiting for another thread while holding the locks could deadlock with it
        # (its insert waits for them), so nothing taken under them waits (``_under_locks``).
        owned = {i: a for i, a in self.load_many({ids.account_id(c.tenant) for c in commands if c.tenant},
                                                  trust_cache=True).items() if a is not None}
        prepared: list[_Batch] = []
        # What the batch will read first (the accounts from their owned versions, the receipts), read with the
        # locks in one round trip; anything else (a pool) is read as usual.
        versions = {i: a.version for i, a in owned.items()}
        versions.update({c.command_id: 0 for c in commands if c.command_id not in versions})

        def prepare(found: dict[UUID, list[StoredEvent]]) -> Sequence[StoredEvent]:
            batch = self._prepare(commands, tracking, record_rejections, known=(versions, found), owned=owned)
            prepared.append(batch)
            return batch.stored

        assert isinstance(self.recorder, BinaryArrayProcessRecorder)
        read = (self.reader, versions) if isinstance(self.reader, PostgresEventReader) else None
        self._under_locks.active = True
        try:
            self.recorder.insert_events_exclusively(prepare, tracking, read, locked)
        except BaseException:
            self.give_back(owned)  # those no command changed are committed state still
            raise
        finally:
            self._under_locks.active = False
        prepared[0].return_to_cache()
        found = prepared[0].known[1] if prepared[0].known is not None else {}
        stale = any(found.get(i) for i, v in versions.items() if v > 0)
        return prepared[0].results, stale

    def apply_chunks(self, chunks: Sequence[tuple[Sequence[LedgerCommand], Tracking | None]]
                     ) -> list[CommandResult]:
        """Applies each chunk as its own transaction, in order, preparing chunk k+1 while chunk k commits.

        Python (domain, encoding) and PostgreSQL (insert, commit) then work at the same time, on two cores.
        Chunk k+1 starts from chunk k's aggregates before k is durable; if k's commit fails, k+1 is thrown
        away unrecorded. Every chunk before k is committed with its own ``Tracking`` position, so a retry
        resumes exactly there. A chunk that lost a race (``IntegrityError``: another writer, e.g. an HTTP
        hold, recorded one of its accounts first) is applied again at once, deciding under locks
        (``exclusive``: its accounts', see ``_apply_exclusively``), which cannot lose again, and so are the
        chunks after it while the contention lasts (:mod:`billing_ledger.contention`, renewed while those
        decisions find the accounts changed by another writer); then pipelining resumes. Any other failure,
        or a second ``IntegrityError`` (its tracking position is already recorded), is raised.
        """
        self._pipelining.active = True
        try:
            return self._apply_chunks(chunks)
        except BaseException:
            self.cache.release_mine()  # the failed batches' aggregates are dropped: nobody waits for them
            raise
        finally:
            self._pipelining.active = False

    def _apply_chunks(self, chunks: Sequence[tuple[Sequence[LedgerCommand], Tracking | None]]
                      ) -> list[CommandResult]:
        results: list[CommandResult] = []
        start = 0
        while start < len(chunks):
            if self.can_decide_exclusively and self.contention.recent(time.monotonic()):
                # Another writer is changing these accounts: decide under their locks, one chunk at a time.
                results += self.apply_commands(*chunks[start], exclusive=True, contention=self.contention)
                start += 1
                continue
            failed = self._apply_pipelined(chunks[start:], results)
            if failed is None:
                break
            self.cache.release_mine()  # the chunks from the failed one on are dropped, to be decided again
            self.contention.conflicted(time.monotonic())
            commands, tracking = chunks[start + failed]
            log.debug("chunk_conflict_retried_exclusively", commands=len(commands))
            results += self.apply_commands(commands, tracking, exclusive=True, contention=self.contention)
            start += failed + 1
        return results

    def _apply_pipelined(self, chunks: Sequence[tuple[Sequence[LedgerCommand], Tracking | None]],
                         results: list[CommandResult]) -> int | None:
        """Pipelines ``chunks`` (adding each committed chunk's results to ``results``); the index of a chunk
        whose commit conflicted, if it can be retried exclusively (nothing after it was recorded)."""
        previous: _Batch | None = None
        previous_index = -1
        try:
            for index, (commands, tracking) in enumerate(chunks):
                batch = self._prepare(commands, tracking, True, after=previous)
                if previous is not None:
                    self._finish(previous, results)
                batch.after = None  # durable now: nothing more to take from it
                batch.committing = self._committer().submit(self._commit, batch)
                previous, previous_index = batch, index
            if previous is not None:
                self._finish(previous, results)
        except IntegrityError:
            # Only the commit of ``previous`` can conflict (preparing reads, and may wait for that commit).
            if (self.can_decide_exclusively and previous is not None and previous.committing is not None
                    and previous.committing.done()
                    and isinstance(previous.committing.exception(), IntegrityError)):
                return previous_index
            raise
        finally:
            if previous is not None and previous.committing is not None:
                concurrent.futures.wait([previous.committing])  # never leave a commit running behind
        return None

    @staticmethod
    def _finish(batch: _Batch, results: list[CommandResult]) -> None:
        """Waits for ``batch``'s commit (raises if it failed), then caches its aggregates and keeps its results."""
        assert batch.committing is not None
        batch.committing.result()
        batch.return_to_cache()
        results += batch.results

    def _committer(self) -> ThreadPoolExecutor:
        if self._commit_executor is None:
            self._commit_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-commit")
        return self._commit_executor

    def snapshot_lagging(self) -> int:
        """Snapshots of the cached aggregates far past their latest snapshot (a graceful stop, see snapshots.py);
        how many were written."""
        return self.snapshotter.take_lagging(self.cache) if self.snapshotter is not None else 0

    def close(self) -> None:
        if self._commit_executor is not None:
            self._commit_executor.shutdown(wait=True)
        if self.snapshotter is not None:
            self.snapshotter.close()
        super().close()

    def _prepare(self, commands: Sequence[LedgerCommand], tracking: Tracking | None, record_rejections: bool,
                 after: _Batch | None = None, trust_cache: bool = False, known: _Known | None = None,
                 owned: Mapping[UUID, Any] | None = None, memory_only: bool = False) -> _Batch:
        """A batch deciding ``commands``. ``owned``: aggregates taken already (``_apply_locked``), brought up to
        date here with the events ``known`` read after their versions."""
        batch = _Batch(self, tracking, after)
        batch.trust_cache = trust_cache
        batch.memory_only = memory_only
        batch.known = known
        if owned:
            found = known[1] if known is not None else {}
            batch.loaded.update({i: self._mutated(a, found.get(i, ())) for i, a in owned.items()})
        batch.prefetch({ids.account_id(c.tenant) for c in commands if c.tenant}, [c.command_id for c in commands])
        batch.results = [self._apply_one(batch, command, record_rejections) for command in commands]
        batch.collect()
        batch.stored = batch.stored_receipts + self._to_stored_events(batch.processing.events)
        return batch

    def _to_stored_events(self, events: Sequence[Any]) -> list[StoredEvent]:
        """``self.mapper.to_stored_event`` of each of ``events``: the same stored events, those whose state is
        plain values (``encode_plain_state``: a usage debit's) encoded without the transcoder's walk."""
        mapper = self.mapper
        if mapper.compressor is not None or mapper.cipher is not None or type(mapper.transcoder) is not OrjsonTranscoder:
            return [mapper.to_stored_event(e) for e in events]
        stored = []
        for event in events:
            cls = type(event)
            topic = _TOPICS.get(cls)
            if topic is None:  # class_version > 1 adds a key to the state: such events go the mapper's way
                topic = _TOPICS[cls] = get_topic(cls) if getattr(cls, "class_version", 1) == 1 else ""
            state = dict(event.__dict__)
            originator_id = state.pop("originator_id")
            originator_version = state.pop("originator_version")
            encoded = encode_plain_state(state) if topic else None
            stored.append(mapper.to_stored_event(event) if encoded is None else StoredEvent(
                originator_id=originator_id, originator_version=originator_version, topic=topic, state=encoded))
        return stored

    def _commit(self, batch: _Batch) -> None:
        if batch.stored or batch.processing.tracking is not None:
            self.recorder.insert_events(batch.stored, tracking=batch.processing.tracking)

    def _apply_one(self, batch: _Batch, command: LedgerCommand, record_rejections: bool) -> CommandResult:
        receipt = batch.loaded.get(command.command_id)
        if batch.is_duplicate(command.command_id):
            first = receipt.outcome if isinstance(receipt, CommandReceipt) else None
            reason = receipt.reason if isinstance(receipt, CommandReceipt) else None
            return CommandResult(command.command_id, "duplicate", reason, first_outcome=first)
        handler = HANDLERS.get(command.kind)
        outcome, reason, value, detail = "applied", None, None, None
        if handler is None:
            outcome, reason, detail = "rejected", "unknown_command", f"no handler for {command.kind!r}"
        else:
            batch.begin_command(command)
            try:
                value = handler(self, batch, command)
            except CommandRejected as exc:
                batch.rollback()
                outcome, reason, detail = "rejected", exc.reason, exc.detail
                log.info("command_rejected", kind=command.kind, tenant=command.tenant, reason=exc.reason,
                         detail=exc.detail)
            except (LedgerError, AllocationError, SubscriptionError, RosterError, InvoiceError) as exc:
                # A domain check refused it; whatever earlier steps of this command changed is undone.
                batch.rollback()
                outcome, reason, detail = "rejected", _snake(type(exc).__name__), str(exc)
                log.info("command_rejected", kind=command.kind, tenant=command.tenant, reason=reason,
                         detail=str(exc))
            except (KeyError, TypeError, ValueError) as exc:
                if batch.command_changed_something():
                    raise  # a bug half-way through a movement: fail the batch rather than record half of it
                outcome, reason, detail = "rejected", "invalid_command", f"malformed payload: {exc!r}"
                log.warning("command_invalid", kind=command.kind, tenant=command.tenant, error=repr(exc))
        if outcome == "rejected" and not record_rejections:
            return CommandResult(command.command_id, outcome, reason, detail=detail)
        recorder = REJECTION_RECORDERS.get(command.kind) if outcome == "rejected" else None
        if recorder is not None:  # after the rollback: it stays whatever the command had changed
            batch.begin_command(command)
            recorder(batch, command, reason, detail)
        self._record_receipt(batch, command, outcome, reason)
        if outcome == "rejected" and command.kind in KEPT_WHEN_REJECTED:
            self._keep_rejected(batch, command, reason, detail)
        batch.receipts.add(command.command_id)
        return CommandResult(command.command_id, outcome, reason, value, detail=detail)

    def _keep_rejected(self, batch: _Batch, command: LedgerCommand, reason: str | None, detail: str | None) -> None:
        """The receipt's second event: the rejected command as it came, with the rejection's detail (see
        ``handles``). Rare (a gateway refund the ledger cannot book), so it goes the mapper's way."""
        kept = CommandReceipt.rejected_command_kept(
            command_id=command.command_id, reason=reason, detail=detail, at=batch.now,
            command={"kind": command.kind, "tenant": command.tenant, "issued_at": command.issued_at.isoformat(),
                     "issued_by": command.issued_by, "payload": jsonable(dict(command.payload))})
        if self.mapper.compressor is None and self.mapper.cipher is None:
            batch.stored_receipts.append(self.mapper.to_stored_event(kept))  # after its receipt's first event
        else:
            batch.processing.events.append(kept)


    def _record_receipt(self, batch: _Batch, command: LedgerCommand, outcome: str, reason: str | None) -> None:
        """Adds the command's receipt to the batch (stored before the batch's aggregate events).

        One receipt per command is a third of the events a usage batch stores, so it is encoded straight to
        the stored form the mapper would write (``CommandReceipt.recorded_state``), skipping the event object
        and the transcoder's walk; with a compressor or cipher configured it goes the mapper's way.
        """
        if self.mapper.compressor is None and self.mapper.cipher is None:
            state = CommandReceipt.recorded_state(
                command_id=command.command_id, kind=command.kind, tenant=command.tenant, outcome=outcome,
                reason=reason, issued_by=command.issued_by, at_tagged=batch.now_tagged)
            batch.stored_receipts.append(StoredEvent(
                originator_id=command.command_id, originator_version=CommandReceipt.INITIAL_VERSION,
                topic=RECEIPT_RECORDED_TOPIC, state=orjson.dumps(state, option=orjson.OPT_PASSTHROUGH_DATETIME)))
            return
        batch.processing.events.append(CommandReceipt.recorded(
            command_id=command.command_id, kind=command.kind, tenant=command.tenant, outcome=outcome,
            reason=reason, issued_by=command.issued_by, at=batch.now))


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


HANDLER_MODULES = (
    "account_commands", "adjustment_commands", "allocation_commands", "catalog_commands", "expiry_commands",
    "hold_commands", "payment_commands", "refund_commands", "subscription_commands", "invoice_commands",
    "checkout_commands",
    "payment_settings_commands", "payment_method_commands", "refund_request_commands", "revenue_commands",
    "usage_commands", "dispute_commands", "credit_note_usage_commands",
)


def register_handlers() -> None:
    """Imports every handler module (each registers its kinds with ``@handles``).

    Called when an application is built, not at import time: handler modules import this module, so
    importing them from here at module level would make the import order matter.
    """
    import importlib

    for name in HANDLER_MODULES:
        importlib.import_module(f"billing_ledger.{name}")


def _apply_failed(aggregate: Any) -> bool:
    """An event of ``aggregate`` failed half-way through being applied (``ChainedAggregate.trigger_event``): its
    state is not what its events say, so it must be rebuilt, never kept or cached."""
    return bool(aggregate.__dict__.get(APPLY_FAILED))
