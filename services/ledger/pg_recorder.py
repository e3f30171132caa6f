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

**Deciding under locks** (``insert_events_exclusively``). The usual write is optimistic: decide on the
state read (or cached) before, then insert the next versions, which fails with ``IntegrityError`` if another
writer recorded one of them first. When writers keep touching the same accounts (HTTP holds on the accounts
a usage batch is debiting) the optimistic retry can lose again and again, and every loss throws away the
aggregates it decided on (they are replayed from the store). This method takes locks *first*, then lets the
caller read and decide, and inserts what it decided in the same transaction. The caller's other reads run
on another pooled connection (reads never wait for these locks).

*Locks of aggregates.* Normally the locks taken are those of the aggregates about to be decided on (the
commands' accounts): one transaction-scoped advisory lock per aggregate (``lock_aggregates_statement``),
and **every insert through this class first takes the locks of the existing aggregates it adds events to**
(``existing_aggregates``). While a decision holds an account's lock no other writer can record an event of
that account, so the state read is current and the insert cannot conflict on its version; writers of other
accounts go on meanwhile. The table's insert lock is taken only with the insert, in the round trip that
commits: it is held while PostgreSQL inserts and commits, never across a decision or a round trip. Every
writer takes its locks in one order (aggregates by key, then the tracking position's row, then the table's
lock), so no two wait for each other in opposite orders. Measured with ``tests/bench/bench_ledger.py``
(holds at 200/s while another process commits usage on the same 200 accounts, decided under locks in
transactions of ``CONTENDED_CHUNK_COMMANDS_MAX``): under the table's lock, each usage transaction held it
~3 ms (lock and read, decision, insert and commit), and with the holds' own decisions it was taken most of
the time, every hold waiting behind it (hold p50 4.9-6.7 ms, p99 13-21 ms, 3,700-4,100 debits/s committed);
under the accounts' locks a hold waits only for a transaction deciding its own account (~6% of the time:
each account is in ~24 such transactions a second, ~2.5 ms each), and the table's lock only for inserts and
commits (hold p50 4.1-4.3 ms, p99 9.6-10.9 ms, 4,500-4,800 debits/s committed, on the same machine at
quiet moments; noisy ones double every figure).

*The table's lock* is the last resort (``locked=None``): a decision under its accounts' locks can still lose
on an aggregate they do not cover (a pool, an invoice, the receipt of the same command applied elsewhere at
that moment), and is then decided once more under the table's lock, which no writer can pass. That
decision takes no aggregate locks (it never waits for one while holding the table's), so it can make a
decision under aggregate locks lose instead: rare, and correctness never rests on any of these locks. A
lost race writes nothing: every event's (aggregate, version) is unique, every command has one receipt, and
a tracking position is recorded once.

**Round trips.** Every round trip of a small transaction is two more wake-ups (PostgreSQL's backend, then
this thread) on a machine whose cores are shared, each a chance to wait for a core, and every message sent
is a system call (expensive on a virtual machine). An insert (``insert_events``) is therefore ONE statement
on the pool's autocommit connection: a call of the PL/pgSQL function this recorder creates with its tables
(``<events table>_insert_arrays``), which takes the aggregates' locks, records the tracking position (a
position not beyond the recorded one raises a unique violation), takes the table's lock and inserts; the
statement is its own transaction, committed before PostgreSQL answers, and a conflict or a refused position
rolls all of it back. psycopg's pipeline mode, used for this before, sent ``BEGIN``, each statement and
``COMMIT`` as messages of their own (about 0.3 ms more client CPU per transaction here). The library reads
the tracking result first, then inserts, then commits in a third round trip, holding the table's lock
across two. Deciding under locks, the locks, the tracking position and the read go in the first round trip
of a pipelined transaction, and the insert (with the table's lock) goes with the commit in the second.

Selected with eventsourcing's ``PROCESS_RECORDER_TOPIC`` setting (see ``application.persistence_env``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

from eventsourcing.persistence import IntegrityError, InterfaceError, OperationalError, StoredEvent, Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresProcessRecorder
from eventsourcing.utils import retry
from psycopg import Cursor
from psycopg.rows import DictRow, tuple_row
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
        # Locks of single aggregates (see "Deciding under locks"): two-key advisory locks in a space of their
        # own per event table, the second key from the first four bytes of the aggregate's id (uuid4 and
        # uuid5 ids are uniformly random there; two aggregates sharing a key only wait for each other).
        self.lock_aggregates_statement = SQL(
            "SELECT pg_advisory_xact_lock(hashtext({space}), k) FROM unnest(%b::int4[]) AS k"
        ).format(space=Literal(f"{datastore.schema}.{events_table_name}#aggregates"))
        # The whole of an insert (see insert_events) as one server-side function, created with the tables. The
        # library's single-row tracking upsert records a position only if it is greater than the one recorded
        # (and returns no row otherwise, the library then raising IntegrityError after reading the result);
        # here a refused position raises a unique violation inside the transaction, which rolls it back.
        function = Identifier(datastore.schema, f"{events_table_name}_insert_arrays"[:63])
        self.sql_create_statements.append(SQL(
            "CREATE OR REPLACE FUNCTION {function}(p_keys int4[], p_application_name text, p_notification_id bigint, "
            "p_ids uuid[], p_versions bigint[], p_topics text[], p_states bytea[]) RETURNS void LANGUAGE plpgsql AS "
            "$BODY$ BEGIN "
            "SET LOCAL lock_timeout = '{lock_timeout}s'; "
            "PERFORM pg_advisory_xact_lock(hashtext({space}), k) FROM unnest(p_keys) AS k; "
            "IF p_application_name IS NOT NULL THEN "
            "  INSERT INTO {schema}.{tracking} AS t VALUES (p_application_name, p_notification_id) "
            "  ON CONFLICT (application_name) DO UPDATE SET notification_id = p_notification_id "
            "  WHERE t.notification_id < p_notification_id; "
            "  IF NOT FOUND THEN "
            "    RAISE unique_violation USING MESSAGE = format('Failed to record tracking for %s %s', "
            "      p_application_name, p_notification_id); "
            "  END IF; "
            "END IF; "
            "PERFORM pg_advisory_xact_lock(hashtext({schema_name}), hashtext({table_name})); "
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(p_ids, p_versions, p_topics, p_states); "
            "END $BODY$"
        ).format(function=function, lock_timeout=int(datastore.lock_timeout),
                 space=Literal(f"{datastore.schema}.{events_table_name}#aggregates"),
                 schema=Identifier(datastore.schema), tracking=Identifier(tracking_table_name),
                 table=Identifier(events_table_name), schema_name=Literal(datastore.schema),
                 table_name=Literal(events_table_name)))
        self.select_notification_rows_statement = SQL(
            "SELECT notification_id, originator_id::text, originator_version, topic, state FROM {schema}.{table} "
            "WHERE notification_id >= %b ORDER BY notification_id LIMIT %b"
        ).format(schema=Identifier(datastore.schema), table=Identifier(events_table_name))
        self.insert_arrays_function_statement = SQL(
            "SELECT {function}(%b::int4[], %b::text, %b::bigint, %b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
        ).format(function=function)

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def select_notification_rows(self, start: int, limit: int) -> list[tuple[int, str, int, str, bytes]]:
        """``select_notifications(start, limit)`` as plain rows (id, originator id as text, version, topic,
        state), in binary: no row dicts, UUID objects or ``Notification``s (the relay's read, which needs none of
        them: 6.5-8 -> ~3 us per event)."""
        with self.datastore.get_connection() as conn, conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(self.select_notification_rows_statement, (start, limit), prepare=True)
            return curs.fetchall()

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> Sequence[int] | None:
        """As the library's, in ONE statement: the insert function's call (see "Round trips"), its own
        transaction on the autocommit connection. A conflicting insert, or a position not greater than the
        one recorded, raises ``IntegrityError`` and writes nothing. The table lock is held only while
        PostgreSQL inserts and commits.
        """
        tracking: Tracking | None = kwargs.get("tracking")
        if not stored_events or (tracking is not None and not self.datastore.single_row_tracking):
            return super().insert_events(stored_events, **kwargs)  # a position alone, or legacy tracking
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            # The connection is in autocommit mode: the statement is its own transaction, committed before
            # PostgreSQL answers it.
            curs.execute(self.insert_arrays_function_statement, (
                aggregate_keys(existing_aggregates(stored_events)),
                tracking.application_name if tracking is not None else None,
                tracking.notification_id if tracking is not None else None,
                *column_arrays(stored_events),
            ), prepare=True)
        return None

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        # As PostgresApplicationRecorder: lock, then insert (without its NOTIFY).
        timeout_set = self._lock_aggregates(curs, existing_aggregates(stored_events))
        self._lock_table(curs, timeout_set=timeout_set)
        self._insert_rows(curs, stored_events)

    def _lock_aggregates(self, curs: Cursor[DictRow], aggregate_ids: Iterable[UUID]) -> bool:
        """Waits for (then holds until commit or rollback) the locks of ``aggregate_ids``, in one order.
        Whether it set the transaction's lock timeout (it does when there is anything to lock)."""
        keys = aggregate_keys(aggregate_ids)
        if not keys:
            return False
        curs.execute(self.lock_table_statements[0], prepare=True)  # SET LOCAL lock_timeout
        curs.execute(self.lock_aggregates_statement, (keys,), prepare=True)
        return True

    def _lock_table(self, curs: Cursor[DictRow], *, timeout_set: bool = False) -> None:
        """The library's table lock (here the advisory insert lock), without setting the transaction's lock
        timeout again when ``_lock_aggregates`` set it already (one statement less per insert)."""
        for statement in self.lock_table_statements[1 if timeout_set else 0:]:
            curs.execute(statement, prepare=True)

    def _insert_rows(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent]) -> None:
        # No NOTIFY (see the module docstring).
        curs.execute(self.insert_arrays_statement, column_arrays(stored_events))

    def _fetch_ids_after_insert_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        return None

    def insert_events_exclusively(
        self, prepare: Callable[[dict[UUID, list[StoredEvent]]], Sequence[StoredEvent]],
        tracking: Tracking | None = None, read: tuple[PostgresEventReader, Mapping[UUID, int]] | None = None,
        locked: Iterable[UUID] | None = None,
    ) -> None:
        """Takes the locks of the aggregates ``locked`` (None: the event table's lock), records ``tracking``,
        calls ``prepare(events read)`` and inserts the events it returns, in one transaction (see the module
        docstring). If ``prepare`` raises, nothing is written.

        Pipelined, so locks are held for as few round trips as possible: the first takes the locks, records
        the tracking position (a position already recorded raises ``IntegrityError`` before anything is
        decided) and, with ``read`` = (reader, {aggregate id: version}), reads the events recorded after those
        versions on the same connection: the query starts after the locks are granted, so (READ COMMITTED) it
        sees every event any writer committed, and none of the locked aggregates can get another until this
        transaction ends. After ``prepare`` the insert and the commit go in one more round trip (with the
        aggregates' locks, the table's lock is taken there, just before the insert).
        """
        error: Exception | None = None
        found: dict[UUID, list[StoredEvent]] = {}
        with self.datastore.get_connection() as conn:
            with conn.pipeline() as pipeline, conn.transaction():
                with conn.cursor() as curs, conn.cursor() as position:
                    try:
                        timeout_set = self._lock_aggregates(curs, locked) if locked is not None else False
                        single_row = self.datastore.single_row_tracking
                        if tracking is not None and single_row:
                            # The library's upsert, its result read after the sync (reading it at once would
                            # be a sync of its own), not raised as an error: an error inside this round trip
                            # leaves the pipeline aborted, and psycopg then ends the transaction with
                            # PipelineAborted rather than the unique violation.
                            position.execute(self.insert_tracking_statement, {
                                "application_name": tracking.application_name,
                                "notification_id": tracking.notification_id}, prepare=True)
                        elif tracking is not None:
                            self._insert_tracking(curs, tracking=tracking)  # legacy multi-row tracking
                        if locked is None:
                            self._lock_table(curs)
                        if read is not None and read[1]:
                            read[0].send(conn, curs, read[1], in_transaction=True)
                        pipeline.sync()  # the locks are held from here until commit or rollback
                        if tracking is not None and single_row and position.fetchone() is None:
                            raise IntegrityError(f"Failed to record tracking for {tracking.application_name} "
                                                 f"{tracking.notification_id}")  # as the library
                        if read is not None and read[1]:
                            found = read[0].received(curs)
                    except Exception as exc:  # noqa: BLE001 - raised below, after the pipeline (as the library)
                        error = exc
                if error is None:
                    stored_events = prepare(found)
                    if stored_events:
                        with conn.cursor() as curs:
                            if locked is not None:
                                self._lock_table(curs, timeout_set=timeout_set)
                            self._insert_rows(curs, stored_events)  # conflicts surface at the commit's sync
            if error is not None:
                raise error


def existing_aggregates(stored_events: Sequence[StoredEvent]) -> set[UUID]:
    """The aggregates that ``stored_events`` add to (not create): whoever records one takes its lock first."""
    return {e.originator_id for e in stored_events if e.originator_version > 1}


def aggregate_keys(aggregate_ids: Iterable[UUID]) -> list[int]:
    """The second keys of the advisory locks of ``aggregate_ids``, in the one order every writer takes them."""
    return sorted({int.from_bytes(i.bytes[:4], "big", signed=True) for i in aggregate_ids})


def column_arrays(stored_events: Sequence[StoredEvent]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """The four columns of ``stored_events`` as arrays (ids, versions, topics, states), for an insert from
    ``unnest`` of binary arrays (this recorder's, and the snapshot writer's)."""
    return ([e.originator_id for e in stored_events], [e.originator_version for e in stored_events],
            [e.topic for e in stored_events], [e.state for e in stored_events])
