"""Snapshots of long event streams, so that loading an account does not replay its whole history.

An account's stream grows by two to three events with every usage event: a tenant sending 100 usage events a
second records millions a day. An account not in this process's memory (after a restart, after the cache
evicted it) was replayed from its first event, ~30 us per event here: minutes for such a tenant, during which
its partition's usage waited. Now every ``SNAPSHOT_EVENTS_INTERVAL`` events of an account (or resource pool)
its state is stored in eventsourcing's snapshot table, and loading starts from the latest snapshot and reads
only the events recorded after it (``LedgerApplication.load_many``, one query for many aggregates).

* **A snapshot is a cache of the events, never a source of truth.** It is written after the events it sums up
  are committed, in a transaction of its own; a snapshot lost in a crash only means a longer replay. The
  audit (``billing audit verify``) replays the account from its events alone and also checks the latest
  snapshot against that replay.
* **When.** A snapshot is taken when an aggregate goes back to the cache after a committed transaction
  (``_Batch.return_to_cache``: it is exactly at its committed version, and no other thread holds it), once
  ``SNAPSHOT_EVENTS_INTERVAL`` events were recorded since its last one (more for a big state: at most one
  per ``SNAPSHOT_STATE_BYTES_PER_EVENT`` bytes of its last snapshot, so its encoding costs at most ~11 % of
  the replay it saves: an account with 3,000 active holds, ~1 MB, every ~10,000 events). It is encoded there (~0.5 ms for an
  account with 40 active holds) and written by a thread of its own (``ledger-snapshots``), the snapshots
  waiting at that moment in one statement: written by the thread that took it, a snapshot made a hold wait
  for its write (5-10 ms with eventsourcing's insert), at 200 holds/s about one hold in 200, right at the
  p99. On PostgreSQL the rows go as binary arrays (``ON CONFLICT DO NOTHING``: another process may have
  written the same version). A full queue (``SNAPSHOT_QUEUE_MAX``) drops snapshots: they are a cache.
* **At a graceful stop** (``take_lagging``, from ``LedgerApplication.snapshot_lagging``) the cached aggregates
  that are ``SNAPSHOT_AT_STOP_EVENTS_MIN`` or more events past their latest snapshot are snapshotted, most
  behind first, within ``SNAPSHOT_AT_STOP_SECONDS``: after a restart (a deploy) the next process replays none
  of those events, where a big state would otherwise replay up to ~10,000 of them when first touched.
* **Format.** A snapshot is the aggregate's attributes (``Snapshot.take``), tagged with the format of its
  class in ``FORMATS``. A snapshot of another format is ignored (the aggregate is replayed from its events,
  and snapshotted again later in the current format): **bump an aggregate's format whenever the attributes
  its events build change** (a new attribute, another meaning or shape of one).
  ``tests/unit/ledger/test_snapshots.py`` fails when an account's or pool's attributes change without it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from uuid import UUID

from billing_ledger.bulk_reads import PostgresEventReader
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.allocation import ResourcePool
from billing_ledger.limits import (
    SNAPSHOT_AT_STOP_EVENTS_MIN,
    SNAPSHOT_AT_STOP_SECONDS,
    SNAPSHOT_EVENTS_INTERVAL,
    SNAPSHOT_QUEUE_MAX,
    SNAPSHOT_STATE_BYTES_PER_EVENT,
    SNAPSHOT_VERSIONS_KEPT_MAX,
)
from billing_ledger.pg_recorder import column_arrays
from billing_runtime.logging import get_logger
from eventsourcing.domain import Aggregate, Snapshot
from eventsourcing.persistence import (
    EventStore,
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
)
from eventsourcing.postgres import PostgresAggregateRecorder
from eventsourcing.utils import get_topic, retry
from psycopg.sql import SQL, Identifier

if TYPE_CHECKING:
    from billing_ledger.aggregate_cache import AggregateCache
    from billing_ledger.application import LedgerApplication

log = get_logger(__name__)

# The aggregates with long streams, and the format of their snapshots (see the module docstring).
# BillingAccount 2: the money of a credit-unit purchase grant keeps its recognition (recognised, breakage,
# adjusted, recognised_at). 3: the overage each unpaid invoice billed (_invoiced_overage). 4: the fees and tax
# each unpaid subscription invoice billed (_invoice_billed). 5: a give-back reduces the unbilled overage period by
# period, never below zero (the same attributes, another meaning of _unbilled). 6: the invoice that billed each
# period's overage and what a usage correction can still credit by a credit note (_billed_periods). 7: the
# subscription fees billed in advance and not yet recognised (_fee_schedules). 8: credits for unused time taken
# from a renewal draft's fee before it is billed (_pending_fee_credits). 9: every invoice that billed a period's
# overage, each with what a correction can still credit (_billed_periods: period -> list). 10: the minimum spend each
# period was billed against and its usage spend since (_period_minimums). 11: each grant keeps what each of its
# refunds paid back (refunds_paid_back in _grants: a gateway refund of an order's rest is told from a partial
# refund's own payout). 12: the meters each period's unbilled overage came from (_unbilled_meters). 13: the rounding
# of each unpaid invoice's usage lines posted with its overage (_overage_rounding). 14: each grant keeps when usage
# stops drawing it (drawable_until in _grants: a rollover plan credit is drawn in its own period only). 15: each grant
# keeps its usage given back after it lapsed (reversed in _grants), and an expired grant's draws stay remembered
# (_recent_draws). 16: each grant keeps the credit negative adjustments took from it and what of it override refunds paid
# back (adjusted, adjusted_reversed in _grants). 17: each unbilled period's overage by usage time (_overage_times). 18:
# a usage_reversal credit keeps what gateway refunds took back of each grant's usage it reversed (taken_back in
# _grants). 19: usage of a usage_reversal credit a gateway refund made owed, until a give-back or credit bought clears it
# or an invoice billing it is paid (_owed_usage). 20: what each manual adjustment left, the answer a retry of it gets
# (_adjustments). 21: gateway refunds that came before the payment they give back wait for it (_parked_refunds). 22: what each grant
# refund took from where and paid back, the answer a retry of it gets (_refunds).
# 23: disputes (chargebacks) of the account's payments and the funds the gateway withdrew for them (_disputes).
# 24: each grant keeps whether it is a plan credit left open after its period for that period's late usage
# (late_usage in _grants: the sweep, not the renewal, lapses it) and whether it is set aside (set_aside).
# 25: each dispute in _disputes keeps the gateway's fee booked for it (fee, fee_at, fee_unbooked).
# 26: each grant keeps what it moved into a next grant when kept for its period's late usage (moved: a rollover's
# carry, a change's rest) and the carry into that grant late usage may still draw (carry in _grants).
# 27: the credit notes' credit usage drew per period, until the invoice of that period applies it after tax
# (_credit_note_spend). 28: each share in a grant's refunds_paid_back names its refund and, for a lost dispute's, the
# dispute (a gateway refund of an order's rest is told from a partial chargeback of the same amount).
# 29: each grant keeps what late usage of the period before drew of it through a carry into it (carry_drawn in
# _grants), and a kept grant's carry the part of it its successor does not hold (carry's reserve, from).
# ResourcePool 2: finished requests are forgotten after a while
# (_finished).
FORMATS: dict[type[Aggregate], int] = {BillingAccount: 29, ResourcePool: 2}
FORMAT_KEY = "_snapshot_format"
SNAPSHOT_WRITE_BATCH_MAX = 500  # snapshots per write statement
_CLASSES = {get_topic(cls): cls for cls in FORMATS}


class Snapshots:
    def __init__(self, app: LedgerApplication, store: EventStore[UUID],
                 interval_events: int = SNAPSHOT_EVENTS_INTERVAL) -> None:
        self._app = app
        self._store = store
        self.interval_events = interval_events
        # The version of each aggregate's latest snapshot, as far as this process knows (0: none).
        self._versions: dict[UUID, int] = {}
        self._sizes: dict[UUID, int] = {}  # bytes of each aggregate's latest snapshot taken here
        recorder = store.recorder
        self._latest_statement = SQL(
            "SELECT s.originator_id, s.originator_version, s.topic, s.state "
            "FROM unnest(%b::uuid[]) AS k(id) CROSS JOIN LATERAL ("
            "SELECT x.originator_id, x.originator_version, x.topic, x.state FROM {schema}.{table} x "
            "WHERE x.originator_id = k.id ORDER BY x.originator_version DESC LIMIT 1) s"
        ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name)) \
            if isinstance(recorder, PostgresAggregateRecorder) else None
        self._insert_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[]) ON CONFLICT DO NOTHING"
        ).format(schema=Identifier(recorder.datastore.schema), table=Identifier(recorder.events_table_name)) \
            if isinstance(recorder, PostgresAggregateRecorder) else None
        self._queue: queue.Queue[list[StoredEvent] | None] = queue.Queue(maxsize=SNAPSHOT_QUEUE_MAX)
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------------------------

    def restore(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, Aggregate]:
        """The aggregates of ``aggregate_ids`` that have a usable snapshot, as of that snapshot."""
        wanted = list(aggregate_ids)
        if not wanted:
            return {}
        restored: dict[UUID, Aggregate] = {}
        for stored in self._latest(wanted):
            aggregate = self._from_stored(stored)
            if aggregate is not None:
                restored[aggregate.id] = aggregate
        for aggregate_id in wanted:
            self._versions[aggregate_id] = restored[aggregate_id].version if aggregate_id in restored else 0
        self._bound()
        return restored

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def _latest(self, aggregate_ids: list[UUID]) -> list[StoredEvent]:
        recorder = self._store.recorder
        if self._latest_statement is None:  # SQLite (embedded): one indexed query per aggregate
            return [e for i in aggregate_ids for e in recorder.select_events(i, desc=True, limit=1)]
        with recorder.datastore.get_connection() as conn, conn.cursor() as curs:  # type: ignore[attr-defined]
            curs.execute(self._latest_statement, (aggregate_ids,), prepare=True)
            return [e for events in PostgresEventReader.received(curs).values() for e in events]

    def _from_stored(self, stored: StoredEvent) -> Aggregate | None:
        try:
            snapshot: Any = self._app.mapper.to_domain_event(stored)
            cls = _CLASSES.get(snapshot.topic)
            if cls is None or snapshot.state.pop(FORMAT_KEY, None) != FORMATS[cls]:
                return None  # another format (or class): replayed from the events instead
            aggregate = snapshot.mutate(None)
        except Exception as exc:  # noqa: BLE001 - a snapshot is only a shortcut: replay instead
            log.warning("snapshot_unusable_replaying", aggregate_id=str(stored.originator_id),
                        version=stored.originator_version, error=repr(exc))
            return None
        assert isinstance(aggregate, Aggregate)
        return aggregate

    # -- taking ----------------------------------------------------------------------------------------------

    def due(self, aggregate: Any) -> bool:
        """Whether ``aggregate`` (committed, owned by the caller) should be snapshotted now: every
        ``interval_events``, or more apart for a big state (see ``SNAPSHOT_STATE_BYTES_PER_EVENT``)."""
        if type(aggregate) not in FORMATS:
            return False
        interval = max(self.interval_events, self._sizes.get(aggregate.id, 0) // SNAPSHOT_STATE_BYTES_PER_EVENT)
        return aggregate.version - self._versions.get(aggregate.id, 0) >= interval

    def encode(self, aggregate: Aggregate) -> StoredEvent:
        """The snapshot of ``aggregate`` as stored (encoded at once: its attributes are the live aggregate's)."""
        snapshot = Snapshot.take(aggregate)
        snapshot.state[FORMAT_KEY] = FORMATS[type(aggregate)]
        return self._app.mapper.to_stored_event(snapshot)

    def write(self, stored: list[StoredEvent]) -> None:
        """Records ``stored`` snapshots in one transaction, now. A failure is logged, not raised: the events they
        sum up are committed, and a missing snapshot only means a longer replay."""
        if not stored:
            return
        try:
            self._insert(stored)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("snapshots_not_written", snapshots=len(stored), error=repr(exc))
            return
        for one in stored:
            self._versions[one.originator_id] = max(self._versions.get(one.originator_id, 0), one.originator_version)
        self._bound()

    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def _insert(self, stored: list[StoredEvent]) -> None:
        recorder = self._store.recorder
        if self._insert_statement is not None:  # one statement, its own transaction (autocommit connection)
            with recorder.datastore.get_connection() as conn, conn.cursor() as curs:  # type: ignore[attr-defined]
                curs.execute(self._insert_statement, column_arrays(stored), prepare=True)
            return
        try:
            recorder.insert_events(stored)
        except IntegrityError:
            # Another process snapshotted one of them at the same version: the same state. One at a time.
            for one in stored:
                try:
                    recorder.insert_events([one])
                except IntegrityError:
                    continue

    def take_due(self, aggregates: Iterable[Any]) -> None:
        """Encodes the due snapshots of ``aggregates`` (owned by the caller) and hands them to the writer."""
        stored = [self.encode(a) for a in aggregates if self.due(a)]
        if not stored:
            return
        for one in stored:  # counted as taken now, so the next commits do not take them again meanwhile
            self._versions[one.originator_id] = one.originator_version
            self._sizes[one.originator_id] = len(one.state)
        self._ensure_writer()
        try:
            self._queue.put_nowait(stored)
        except queue.Full:
            log.warning("snapshots_dropped_queue_full", snapshots=len(stored))

    def take_lagging(self, cache: AggregateCache, events_min: int = SNAPSHOT_AT_STOP_EVENTS_MIN,
                     seconds: float = SNAPSHOT_AT_STOP_SECONDS) -> int:
        """At a graceful stop: snapshots of the cached aggregates with at least ``events_min`` events since their
        latest snapshot, most behind first, taken and written (now, not by the writer thread) for at most about
        ``seconds``; how many. The next process loads them without replaying those events. Each is taken out of the
        cache while it is encoded, so no other thread changes it meanwhile."""
        deadline = time.monotonic() + seconds
        behind = {i: version - self._versions.get(i, 0) for i, version in cache.versions().items()}
        lagging = sorted((i for i, events in behind.items() if events >= events_min), key=behind.__getitem__,
                         reverse=True)
        stored: list[StoredEvent] = []
        taken = 0
        for aggregate_id in lagging:
            if time.monotonic() >= deadline:
                break
            aggregate = cache.take(aggregate_id)
            if aggregate is None:
                cache.release([aggregate_id])
                continue
            try:
                if type(aggregate) in FORMATS:
                    stored.append(self.encode(aggregate))
            finally:
                cache.put(aggregate)
            if len(stored) >= SNAPSHOT_WRITE_BATCH_MAX:  # written as they come: the time allowed covers the writes
                self.write(stored)
                taken, stored = taken + len(stored), []
        self.write(stored)
        taken += len(stored)
        if taken:
            log.info("snapshots_taken_at_stop", snapshots=taken, lagging=len(lagging))
        return taken

    def flush(self) -> None:
        """Waits until every snapshot handed over so far is written (or failed)."""
        self._queue.join()

    def close(self) -> None:
        """Writes what is waiting, then stops the writer."""
        with self._writer_lock:
            writer, self._writer = self._writer, None
        if writer is not None and writer.is_alive():
            self._queue.put(None)
            writer.join(timeout=30)

    def _ensure_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_queued, name="ledger-snapshots", daemon=True)
                self._writer.start()

    def _write_queued(self) -> None:
        while True:
            stored = self._queue.get()
            try:
                if stored is None:
                    return
                while len(stored) < SNAPSHOT_WRITE_BATCH_MAX:  # what else is waiting: one statement
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put(None)  # stop after this write
                        self._queue.task_done()
                        break
                    stored = stored + more
                    self._queue.task_done()
                self.write(stored)
            finally:
                self._queue.task_done()

    def _bound(self) -> None:
        if len(self._versions) > SNAPSHOT_VERSIONS_KEPT_MAX:
            # Forgotten ones count as never snapshotted: at worst one snapshot each earlier than needed.
            self._versions.clear()
            self._sizes.clear()

    # -- audit -----------------------------------------------------------------------------------------------

    def latest(self, aggregate_id: UUID) -> tuple[int, Aggregate | None] | None:
        """(version, aggregate as snapshotted or None if unusable) of ``aggregate_id``'s latest snapshot."""
        found = self._latest([aggregate_id])
        if not found:
            return None
        return found[0].originator_version, self._from_stored(found[0])

