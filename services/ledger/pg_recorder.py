"""eventsourcing's PostgreSQL process recorder with a faster insert: four binary arrays, not a composite array.

The library inserts a batch as ``unnest(%s::stored_event_uuid[])``: an array of composite values that
psycopg dumps as *text*, escaping every byte of every event's state in Python. For a batch of 1,000
events that costs ~30 ms of the ~40 ms the insert takes. Sending the four columns as separate arrays in
psycopg's *binary* format (``%b``) inserts the same rows, under the same table lock, in the same
transaction as the tracking record, in ~10 ms. Everything else (locking, NOTIFY, the tracking table) is the
library's own code. The new notification ids are not returned: nothing in the ledger
uses them (the relay reads the log), and building 1,000 result rows costs another ~3 ms per batch.

Selected with eventsourcing's ``PROCESS_RECORDER_TOPIC`` setting (see ``application.persistence_env``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from eventsourcing.persistence import StoredEvent
from eventsourcing.postgres import PostgresDatastore, PostgresProcessRecorder
from psycopg import Cursor
from psycopg.rows import DictRow
from psycopg.sql import SQL, Identifier


class BinaryArrayProcessRecorder(PostgresProcessRecorder):
    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events",
                 tracking_table_name: str = "notification_tracking") -> None:
        super().__init__(datastore, events_table_name=events_table_name, tracking_table_name=tracking_table_name)
        assert datastore.originator_id_type == "uuid"
        self.insert_arrays_statement = SQL(
            "INSERT INTO {schema}.{table} (originator_id, originator_version, topic, state) "
            "SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
        ).format(schema=Identifier(datastore.schema), table=Identifier(events_table_name))

    def _insert_stored_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                              **kwargs: Any) -> None:
        # Same order of statements as PostgresApplicationRecorder: lock, notify, insert.
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(self.insert_arrays_statement, (
            [e.originator_id for e in stored_events],
            [e.originator_version for e in stored_events],
            [e.topic for e in stored_events],
            [e.state for e in stored_events],
        ))

    def _fetch_ids_after_insert_events(self, curs: Cursor[DictRow], stored_events: Sequence[StoredEvent],
                                       **kwargs: Any) -> Sequence[int] | None:
        return None
