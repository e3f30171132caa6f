"""eventsourcing's PostgreSQL process recorder with a faster insert: four binary arrays, not a composite array.

The library inserts a batch as ``unnest(%s::stored_event_uuid[])``: an array of composite values that
psycopg dumps as *text*, escaping every byte of every event's state in Python. For a batch of 1,000
events that costs ~30 ms of the ~40 ms the insert takes. Sending the four columns as separate arrays in
psycopg's *binary* format (``%b``) inserts the same rows, under the same table lock, in the same
transaction as the tracking record, in ~10 ms. Everything else (locking, NOTIFY, the tracking table) is the
library's own code. The new notification ids are not returned: nothing in the ledger
uses them (the relay reads the log), and building 1,000 result rows costs another ~3 ms per batch.

**The insert lock: an advisory lock, not ``LOCK TABLE``.** The library serialises inserting transactions
(so notification ids commit in order and a follower tailing the log, our relay, never passes a gap that is
filled later) with ``LOCK TABLE ... IN EXCLUSIVE MODE``. That mode also conflicts with the SHARE UPDATE
EXCLUSIVE lock of (auto)vacuum and analyze: whenever autovacuum visits the event table, every writer queues
behind it until PostgreSQL cancels the autovacuum after ``deadlock_timeout`` (1 s by default), a one-second
stall of every hold and batch (seen in ``tests/bench/bench_ledger.py``: p99 ~1,000 ms, with
``canceling autovacuum task`` in the server log); an anti-wraparound vacuum is never cancelled. This
recorder takes a transaction-scoped advisory lock on the table's (schema, name) instead, held from before
the insert draws its notification ids until commit or rollback: the same serialisation of every writer
that inserts through this class, without blocking vacuum. **Every process writing a store must use this
recorder** (``application.persistence_env`` selects it for every ``LedgerApplication``); a writer with the
library's ``LOCK TABLE`` would not be serialised against it, so upgrade a store's writers together.

**No NOTIFY.** The library also sends ``NOTIFY`` in every insert transaction, for eventsourcing's
LISTEN-based subscriptions. Nothing in this service listens (the relay polls the log), and a transaction
that has notified takes PostgreSQL's notification-queue lock at commit, one lock for the whole server: every
commit of every such writer on the server (other services' event stores too) is serialised on it, which
shows as commits of a two-event hold waiting several milliseconds behind unrelated ones. So this recorder
does not notify; ``recorder.subscribe()`` would only see new events when polled.

**Deciding under the lock** (``insert_events_exclusively``). The usual write is optimistic: decide on the
state read (or cached) before, then insert the next versions, which fails with ``IntegrityError`` if another
writer recorded one of them first. When writers keep touching the same accounts (HTTP holds on the accounts
a usage batch is debiting) the optimistic retry can lose again and again. This method takes the same
table lock *first*, then lets the caller read and decide, and inserts what it decided in the same
transaction: while the lock is held no other writer can record an event, so the state read is current and
the insert cannot conflict on a version. The caller's reads run on another pooled connection (reads never
wait for this lock). The lock is held for the time of the decision, so callers use it for the retry of a
conflicted write, not for every write.

**Round trips.** Every round trip of a small transaction is two more wake-ups (PostgreSQL's backend, then
this thread) on a machine whose cores are shared, each a chance to wait for a core. An insert without a
tracking record (the HTTP decisions) sends lock, insert and ``COMMIT`` in ONE pipeline sync (a version
conflict aborts the transaction and is raised at that sync); the library syncs after the insert and commits
in a second round trip. Deciding under the lock, the tracking position is recorded with the lock (first
round trip), and the insert goes with the commit (second), so the lock is held one round trip shorter.

Selected with eventsourcing's ``PROCESS_RECORDER_TOPIC`` setting (see ``application.persistence_env``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresProcessRecorder
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier, Literal

if TYPE_CHECKING:
    from billing_ledger.bulk_reads import PostgresEventReader


class BinaryArrayProcessRecorder(PostgresProcessRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events",
                 tracking_table_name: str = "notification_tracking") -> None:
        super().__init__(datastore, events_table_name=events_table_name, tracking_table_name=tracking_table_name)
        assert datastore.originator_id_type == "uuid"
        self.insert_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
        ).format(schema=Identifier(datastore.schema), table=Identifier(events_table_name))
        # The two-key advisory lock space does not overlap the one-key space (the relay's leader election).
        self.lock_table_statements = [
            self.lock_table_statements[0],  # SET LOCAL lock_timeout, as the library
            SQL("SELECT pg_advisory_xact_lock(hashtext({schema}), hashtext({table}))").format(
                schema=Literal(datastore.schema), table=Literal(events_table_name)),
        ]

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """As the library's, in ONE round trip when there is no tracking record (the HTTP decisions).

        The library syncs its pipeline after the insert (so a version conflict surfaces there), then commits
        in a second round trip. Without a tracking record nothing needs a result before the commit: lock,
        insert and ``COMMIT`` go in one pipeline sync; a conflicting insert aborts the transaction and its
        ``UniqueViolation`` is raised when the pipeline is synced (as ``IntegrityError``, nothing written).
        With a tracking record the library's way is kept (the single-row tracking insert reads its result).
        """
        if kwargs.get("tracking") is not None or not stored_events:
            return super().insert_events(stored_events, **kwargs)
        with self.datastore.get_connection() as conn, conn.pipeline(), conn.transaction(), conn.cursor() as curs:
            self._lock_table(curs)
            self._insert_rows(curs, stored_events)
        return None

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        # As PostgresApplicationRecorder: lock, then insert (without its NOTIFY).
        self._lock_table(curs)
        self._insert_rows(curs, stored_events)

    def _insert_rows(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> None:
        # No NOTIFY (see the module docstring).
        curs.execute(self.insert_arrays_statement, (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        ))

    def _fetch_ids_after_insert_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        return None

    def insert_events_exclusively(
        self, prepare: Callable[[dict[UUID, list[StoredEvent]]], Sequence[StoredEvent]],
        tracking: Tracking | None = None, read: tuple[PostgresEventReader, Mapping[UUID, int]] | None = None,
    ) -> None:
        """Locks the event table, records ``tracking``, calls ``prepare(events read)`` and inserts the events it
        returns, in one transaction (see the module docstring). If ``prepare`` raises, nothing is written.

        Pipelined, so the lock is held for as few round trips as possible: the first takes the lock, records
        the tracking position (a position already recorded raises ``IntegrityError`` before anything is
        decided) and, with ``read`` = (reader, {aggregate id: version}), reads the events recorded after those
        versions on the same connection: the query starts after the lock is granted, so (READ COMMITTED) it
        sees every event any writer committed, and none can be committed until this transaction ends. After
        ``prepare`` the insert and the commit go in one more round trip.
        """
        error: Exception | None = None
        found: dict[UUID, list[StoredEvent]] = {}
        with self.datastore.get_connection() as conn:
            with conn.pipeline() as pipeline, conn.transaction():
                with conn.cursor() as curs:
                    try:
                        self._lock_table(curs)
                        if tracking is not None:
                            self._insert_tracking(curs, tracking=tracking)  # reads its result: a sync
                        if read is not None and read[1]:
                            read[0].send(conn, curs, read[1], in_transaction=True)
                        pipeline.sync()  # the lock is held from here until commit or rollback
                        if read is not None and read[1]:
                            found = read[0].received(curs)
                    except Exception as exc:  # noqa: BLE001 - raised below, after the pipeline (as the library)
                        error = exc
                if error is None:
                    stored_events = prepare(found)
                    if stored_events:
                        with conn.cursor() as curs:
                            self._insert_rows(curs, stored_events)  # conflicts surface at the commit's sync
            if error is not None:
                raise error
