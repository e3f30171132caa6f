"""The projections schema: every read-model table, the positions table, and the schema version.

Read models are disposable: they are rebuilt from ``billing.ledger.events`` alone. When the code's
``SCHEMA_VERSION`` differs from the stored one, every table is dropped and recreated and the positions
start again at 0, so the service replays the topic into the new shape by itself.
"""

from __future__ import annotations

import asyncio

from billing_projections import (
    ai_usage,
    balances,
    catalog,
    figures,
    history,
    invoices,
    revenue,
    subscription_changes,
    subscriptions,
    usage_monthly,
)
from billing_projections.balance_cache import notify_reset
from billing_projections.writer import Table, value
from billing_runtime.db import Connection, Database

# 5: credit packages' money (PurchaseMoney* events) in figures and in the transaction history.
# 6: a usage correction adds the difference it made to the monthly usage quantity, not its new quantity.
# 7: a refund of credit bought in the currency shows the tax paid back with it in its history row's detail.
# 8: subscription credit notes (account credit) in figures' credit_notes / credit_note_tax, no longer in refunds.
# 9: what a gateway refund of an invoice left owed (``InvoicePaymentRefunded.reclaimed.receivable``) in receivables.
# 10: usage_monthly.events counts the events of a close debit (``cause.event_count``), not 1.
# 11: usage_monthly.quantity adds what a debit's event added to its meter (``cause.contribution``, before it
#     ``quantity_after - quantity_before``): a count meter's event counts 1, not its quantity.
# 12: grants.drawable_until (a rollover plan credit; "expiring soon" looks at the earlier of it and expires_at); the
#     history lists an invoice's usage lines' rounding (invoice_rounding, invoice_rounding_reversed) and says what
#     of a give-back was absorbed (detail ``give-back; absorbed N``).
# 13: the history leaves out debits of 0 (usage that cost nothing: no movement); the monthly summary keeps them.
# 14: figures' adjustments count what a finance-override refund takes back from manual_adjustment
#     (``GrantRefunded.from_adjustment``), as the ledger posts it.
# 15: subscription_changes (every change of a subscription's status or price, when it took effect: churn and NRR).
# 16: disputes (chargebacks): history rows of type dispute (a chargeback's refund rows too, no longer refund), figures'
#     chargebacks / chargeback_tax (no longer in refunds) and disputed.
# 17: grants.set_aside_at (a plan credit set aside at its period's end for its late usage, ``GrantSetAside``): the
#     wallets' late_usage_reserve, out of available.
# 18: figures' dispute_fees (what gateways charged for disputes, ``DisputeFeeBooked``); the history's dispute rows show
#     the fee, and a partial chargeback's share of an order's bonus (``GrantPartVoided``) as a void row.
# 19: revenue_daily (deferred and recognised revenue per tenant, day and unit: the revenue report, IFRS 15 close).
# 20: grants.carry_drawn (what late usage of the period before drew of a grant through a carry into it): the grants
#     list shows ``amount`` less it.
SCHEMA_VERSION = "20"

POSITIONS = Table("positions", {"topic": "TEXT", "partition": "INTEGER"}, {
    "next_offset": value("BIGINT NOT NULL"), "last_position": value("BIGINT NOT NULL"),
})
META = Table("projection_meta", {"name": "TEXT"}, {"value": value("TEXT NOT NULL")})

# Every read model's tables; the order is the order of creation (and of comparison in the rebuild test).
READ_MODEL_TABLES: tuple[Table, ...] = (
    *balances.TABLES, *history.TABLES, *usage_monthly.TABLES, *ai_usage.TABLES, *figures.TABLES, *catalog.TABLES,
    *invoices.TABLES, *subscriptions.TABLES, *subscription_changes.TABLES, *revenue.TABLES,
)
ALL_TABLES: tuple[Table, ...] = (POSITIONS, *READ_MODEL_TABLES)
# Tables of earlier schema versions, dropped on upgrade.
_LEGACY_TABLES = ("wallet_holds",)


async def ensure_schema(db: Database, *, secondary_indexes: bool = True) -> bool:
    """Creates the tables; drops them first when the stored schema version differs. True if it dropped.

    ``secondary_indexes=False`` (a rebuild into empty tables): the tables and their primary keys only;
    ``create_secondary_indexes`` adds the rest once the rows are in. Every start of the service runs this with
    them (``CREATE INDEX IF NOT EXISTS``), so a rebuild that stopped half-way leaves no table without its
    indexes for long."""
    async with db.transaction() as conn:
        if db.dialect == "postgres":
            # Several instances starting together: one migrates, the others wait and find it done.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
        for statement in META.ddl(db.dialect):
            await conn.execute(statement)
        stored = await conn.fetchval("SELECT value FROM projection_meta WHERE name = 'schema_version'")
        dropped = False
        if stored != SCHEMA_VERSION:
            await _drop(conn, db.dialect)
            dropped = True
        for table in ALL_TABLES:
            for statement in table.ddl(db.dialect, indexes=secondary_indexes):
                await conn.execute(statement)
        await conn.execute(
            "INSERT INTO projection_meta (name, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value", SCHEMA_VERSION)
    return dropped


async def reset(db: Database, *, secondary_indexes: bool = True) -> None:
    """Drops every projection table and creates them empty (``billing projections rebuild``)."""
    async with db.transaction() as conn:
        if db.dialect == "postgres":
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema()))")
        await _drop(conn, db.dialect)
    await ensure_schema(db, secondary_indexes=secondary_indexes)


async def create_secondary_indexes(db: Database, concurrency: int = 1) -> None:
    """Every table's secondary indexes, ``concurrency`` statements at a time (one connection each).

    A rebuild creates them after its bulk load: maintained row by row during the replay they cost PostgreSQL
    more CPU than one sorted build each at the end (measured: README "Processes")."""
    gate = asyncio.Semaphore(max(1, concurrency))

    async def create(statement: str) -> None:
        async with gate:
            await db.execute(statement)

    await asyncio.gather(*(create(statement) for table in ALL_TABLES for statement in table.index_ddl()))


async def _drop(conn: Connection, dialect: str) -> None:
    if dialect == "postgres":  # the query API's copy of balance states goes too (balance_cache.py)
        await notify_reset(conn)
    for name in (*(t.name for t in ALL_TABLES), *_LEGACY_TABLES):
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
