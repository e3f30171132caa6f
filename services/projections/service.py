"""Projections: build the read models from ``billing.ledger.events``; the query API reads only these.

Exactly once: a partition's batch is ONE transaction holding its rows and its position (next Kafka offset
and last ledger position). A record below the stored offset was applied by an earlier transaction; an
event at or below the stored ledger position was re-relayed by the ledger after a crash. Both are skipped,
so replays and restarts change nothing. The positions row is locked first, so two instances that briefly
both hold a partition (a rebalance) apply its batch once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from billing_projections import (
    ai_usage,
    balance_cache,
    balances,
    catalog,
    debits,
    figures,
    history,
    invoices,
    revenue,
    subscription_changes,
    subscriptions,
    usage_monthly,
)
from billing_projections.facts import Fact, MalformedEvent, parse_event, utc_text
from billing_projections.limits import LOOKUP_KEYS_MAX
from billing_projections.store import ensure_schema, reset
from billing_projections.writer import BatchWriter, Handler
from billing_runtime.bus import Record, header
from billing_runtime.db import Connection, Database
from billing_runtime.logging import get_logger
from prometheus_client import Counter

log = get_logger(__name__)

# Each read model: one module with a pure ``project(fact, writer)``.
PROJECTIONS = (balances, history, usage_monthly, ai_usage, figures, catalog, invoices, subscriptions,
               subscription_changes, revenue)
ACCOUNT_CACHE_ENTRIES_MAX = 100_000

EVENTS_APPLIED = Counter("projections_events_applied_total", "Ledger events applied to the read models")
EVENTS_SKIPPED = Counter("projections_events_skipped_total", "Ledger records skipped", ["reason"])


class ProjectionService:
    def __init__(self, db: Database, *, notify_balances: bool = False) -> None:
        """``notify_balances``: the live consumer's service (PostgreSQL): every transaction notifies the new
        balance states of the tenants it changed (balance_cache.py); without it (a rebuild's replay) a
        transaction only tells the query API to drop its copy."""
        self.db = db
        self._notify_balances = notify_balances
        self._channel: str | None = None
        self._tenants: dict[str, str] = {}  # account id -> tenant (immutable once opened)
        self._handlers: dict[str, tuple[Handler, ...]] = {}  # event type -> the read models' handlers
        self._kinds: dict[str, tuple[str, str]] = {}  # event type -> (aggregate, name)

    def _handlers_of(self, event_type: str) -> tuple[Handler, ...]:
        found = self._handlers.get(event_type)
        if found is None:
            fused = debits.handler_for(event_type)  # every read model's share of a usage debit in one pass
            found = (fused,) if fused is not None else tuple(
                h for m in PROJECTIONS if (h := m.handler_for(event_type)) is not None)
            self._handlers[event_type] = found
        return found

    async def setup(self) -> None:
        if await ensure_schema(self.db):
            log.info("projection_schema_created")

    async def drop(self, *, secondary_indexes: bool = True) -> None:
        """Empties the read models (``secondary_indexes=False``: created later, ``store.create_secondary_indexes``)."""
        self._tenants.clear()
        await reset(self.db, secondary_indexes=secondary_indexes)

    async def start_positions(self, topic: str, partitions: list[int]) -> dict[int, int]:
        rows = await self.db.fetch("SELECT partition, next_offset FROM positions WHERE topic = $1", topic)
        known = {int(r["partition"]): int(r["next_offset"]) for r in rows}
        # A partition never applied starts at the beginning: read models are rebuilt from the whole topic.
        return {p: known.get(p, 0) for p in partitions}

    async def handle_ledger_events(self, records: list[Record]) -> None:
        """One partition's batch (the bus's handler): see ``handle_partitions``."""
        await self.handle_partitions([records])

    async def handle_partitions(self, batches: Sequence[Sequence[Record]], topic: str | None = None) -> None:
        """Applies the batches of several partitions of one topic in ONE transaction with their positions.

        Every row belongs to one partition (an account's events share one, as do a document's), so merging
        the partitions' rows in one writer keeps each row's event order; one transaction per poll instead of
        per partition saves most of the round trips when events come in small batches. The positions rows are
        locked in partition order, so two instances that briefly share partitions cannot deadlock.

        ``topic``: the name the positions are kept under, when the records are the Kafka client's own (a
        rebuild passes them as they come, named after the namespaced topic: only ``partition``, ``offset``
        and ``value`` are read).
        """
        batches = sorted((b for b in batches if b), key=lambda b: b[0].partition)
        if not batches:
            return
        if topic is None:
            topic = batches[0][0].topic
            assert all(b[0].topic == topic for b in batches), "one topic per call"
        postgres = self.db.dialect == "postgres"
        partitions = [b[0].partition for b in batches]
        async with self.db.transaction() as conn:
            stored = await _lock_positions(conn, topic, partitions, postgres)
            # Each event is projected as soon as it is decoded, while its objects are still in the CPU's
            # caches (decoding a whole batch first, then projecting it, costs ~25% more CPU per event: the
            # batch's objects no longer fit). Only an account event whose tenant is not known here (not opened
            # earlier, nor in the cache) needs a query first: from the first such event on, events wait for
            # it and are projected after, in their order.
            if len(self._tenants) >= ACCOUNT_CACHE_ENTRIES_MAX:
                # Forgotten between batches only: within one, an account opened (or looked up) earlier in the
                # batch must stay known, as its Opened row is not in the table before this transaction ends.
                self._tenants.clear()
            writer = BatchWriter()
            waiting: list[dict[str, Any]] = []
            moved: list[tuple[str, int, int, int]] = []
            touched: set[str] = set()  # tenants whose account events this transaction applies
            applied = 0
            handlers_of = self._handlers_of
            fact_of = self._fact
            for records in batches:
                partition = records[0].partition
                next_offset, last_position = stored[partition]
                if records[-1].offset + 1 <= next_offset:
                    EVENTS_SKIPPED.labels("applied_offset").inc(len(records))
                    continue  # the whole batch was applied before
                for record in records:
                    if record.offset < next_offset:
                        EVENTS_SKIPPED.labels("applied_offset").inc()
                        continue
                    skipped = _unwanted_position(record, handlers_of)
                    if skipped is not None:  # e.g. a command receipt: no read model needs it, so not decoded
                        if skipped <= last_position:
                            EVENTS_SKIPPED.labels("re_relayed").inc()
                        else:
                            last_position = skipped
                            applied += 1
                        continue
                    try:
                        event = parse_event(record.value or b"")
                    except MalformedEvent as exc:
                        EVENTS_SKIPPED.labels("malformed").inc()
                        log.error("malformed_ledger_event", partition=partition, offset=record.offset,
                                  error=str(exc)[:300])
                        continue
                    if event["position"] <= last_position:
                        EVENTS_SKIPPED.labels("re_relayed").inc()
                        continue
                    last_position = event["position"]
                    applied += 1
                    handlers = handlers_of(event["type"])
                    if not handlers:
                        continue  # events no read model needs (e.g. command receipts) go no further
                    fact = None if waiting else fact_of(event)
                    if fact is None:
                        waiting.append(event)
                        continue
                    for handler in handlers:
                        handler(fact, writer)
                    if fact.aggregate == "BillingAccount":
                        touched.add(fact.tenant)
                moved.append((topic, partition, records[-1].offset + 1, last_position))
            if not moved:
                return
            if waiting:
                for fact in await self._facts(conn, waiting):
                    for handler in handlers_of(fact.type):
                        handler(fact, writer)
                    if fact.aggregate == "BillingAccount":
                        touched.add(fact.tenant)
            scales_changed = writer.touches(catalog.CATALOG_UNITS)
            await writer.flush(conn, self.db.dialect)
            if postgres:
                await self._notify(conn, touched, scales_changed)
                # one statement, not one execution per partition
                await conn.execute(
                    "UPDATE positions SET next_offset = v.next_offset, last_position = v.last_position "
                    "FROM unnest($2::integer[], $3::bigint[], $4::bigint[]) AS v (partition, next_offset, last_position) "
                    "WHERE positions.topic = $1 AND positions.partition = v.partition",
                    topic, [m[1] for m in moved], [m[2] for m in moved], [m[3] for m in moved])
            else:
                await conn.executemany(
                    "UPDATE positions SET next_offset = $3, last_position = $4 WHERE topic = $1 AND partition = $2",
                    moved)
        EVENTS_APPLIED.inc(applied)

    async def _notify(self, conn: Connection, tenants: set[str], scales_changed: bool) -> None:
        """Tells the query API's copy of balance states (balance_cache.py) what this transaction changes,
        delivered by PostgreSQL when it commits."""
        if self._channel is None:
            self._channel = balance_cache.channel(await conn.fetchval("SELECT current_schema()"))
        if scales_changed or not self._notify_balances:
            await conn.execute("SELECT pg_notify($1, $2)", self._channel, balance_cache.RESET)
        if tenants and self._notify_balances:
            await conn.execute(balance_cache.NOTIFY_SQL, self._channel, sorted(tenants))

    async def _facts(self, conn: Connection, events: list[dict[str, Any]]) -> list[Fact]:
        """Resolves each account event's tenant: from its Opened event, this batch, the cache or the table."""
        tenants = self._tenants
        wanted: set[str] = set()
        opened: set[str] = set()
        for event in events:
            kind = event["type"]
            if kind.startswith("BillingAccount."):
                aggregate_id = event["aggregate_id"]
                if kind == "BillingAccount.Opened":
                    opened.add(aggregate_id)
                elif aggregate_id not in tenants and aggregate_id not in opened:
                    wanted.add(aggregate_id)
        if wanted:
            ids = sorted(wanted)
            for start in range(0, len(ids), LOOKUP_KEYS_MAX):
                chunk = ids[start:start + LOOKUP_KEYS_MAX]
                placeholders = ", ".join(f"${i + 1}" for i in range(len(chunk)))
                for r in await conn.fetch(
                        f"SELECT account_id, tenant FROM accounts WHERE account_id IN ({placeholders})", *chunk):
                    self._remember(r["account_id"], r["tenant"])
        facts: list[Fact] = []
        for event in events:
            fact = self._fact(event)
            if fact is None:
                # The account's Opened event precedes it in the same partition; missing means data loss
                # upstream (e.g. topic retention). Logged loudly; the rest of the partition goes on.
                EVENTS_SKIPPED.labels("unknown_account").inc()
                log.error("event_for_unknown_account", position=event["position"], type=event["type"])
                continue
            facts.append(fact)
        return facts

    def _fact(self, event: dict[str, Any]) -> Fact | None:
        """The event as a fact, its tenant resolved; None for an account event whose tenant is not known here
        (``_facts`` looks those up)."""
        aggregate_id, kind, data = event["aggregate_id"], event["type"], event["data"]
        split = self._kinds.get(kind)
        if split is None:
            aggregate, _, name = kind.partition(".")
            split = self._kinds[kind] = (aggregate, name)
        aggregate, name = split
        if aggregate == "BillingAccount":
            if name == "Opened":
                self._remember(aggregate_id, str(data["tenant"]))
            tenant = self._tenants.get(aggregate_id)
            if not tenant:
                return None
        else:
            found = event.get("tenant")
            tenant = found if type(found) is str else ""
        recorded_at = utc_text(event["recorded_at"])
        occurred_at = data.get("at")  # business time, as facts.business_time
        if type(occurred_at) is not str or not occurred_at:
            occurred_at = data.get("effective_at")
        return Fact(event["position"], aggregate_id, kind, recorded_at, data, tenant,
                    utc_text(occurred_at) if type(occurred_at) is str and occurred_at else recorded_at,
                    aggregate, name)

    def _remember(self, account_id: str, tenant: str) -> None:
        self._tenants[account_id] = tenant  # bounded between batches (handle_partitions), never within one


async def _lock_positions(conn: Connection, topic: str, partitions: list[int], postgres: bool
                          ) -> dict[int, tuple[int, int]]:
    """Locks the partitions' positions rows, in partition order (``partitions`` is sorted), creating any that
    is missing, and returns each one's (next offset, last ledger position).

    PostgreSQL: ``SELECT ... FOR UPDATE`` locks the rows without writing a new version of each (the upsert
    below does: ``ON CONFLICT DO UPDATE`` updates the row); only when a row is missing (a partition's first
    batch) does the upsert run. SQLite (one writer at a time) always upserts."""
    if postgres:
        rows = await conn.fetch(
            "SELECT partition, next_offset, last_position FROM positions WHERE topic = $1 "
            "AND partition = ANY($2::integer[]) ORDER BY partition FOR UPDATE", topic, partitions)
        if len(rows) == len(partitions):
            return {int(r["partition"]): (int(r["next_offset"]), int(r["last_position"])) for r in rows}
    # One round trip: creates each row the first time, locks it (ON CONFLICT DO UPDATE takes the row lock, like
    # SELECT ... FOR UPDATE) and returns the stored positions.
    values = ", ".join(f"($1, ${i + 2}, 0, 0)" for i in range(len(partitions)))
    rows = await conn.fetch(
        f"INSERT INTO positions (topic, partition, next_offset, last_position) VALUES {values} "
        "ON CONFLICT (topic, partition) DO UPDATE SET topic = excluded.topic "
        "RETURNING partition, next_offset, last_position", topic, *partitions)
    return {int(r["partition"]): (int(r["next_offset"]), int(r["last_position"])) for r in rows}


def _unwanted_position(record: Record, handlers_of: Callable[[str], tuple[Handler, ...]]) -> int | None:
    """The position of a record no read model needs, read from its headers (the relay's ``type`` and
    ``position``) without decoding the event; None when the record must be decoded (wanted, or no headers)."""
    event_type = header(record, "type")
    if event_type is None or handlers_of(event_type.decode()):
        return None
    position = header(record, "position")
    return int(position) if position is not None and position.isdigit() else None
