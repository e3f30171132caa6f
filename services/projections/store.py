"""Read-model tables and the exactly-once apply loop shared by every projection.

Every table is rebuilt from ``billing.ledger.events`` alone. A batch's rows and its position (Kafka offset
and ledger position) are written in ONE transaction; a record at or below the stored position is skipped,
so replaying a partition twice, or an event re-relayed by the ledger, changes nothing.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL, last_position BIGINT NOT NULL,
    PRIMARY KEY (topic, partition));
CREATE TABLE IF NOT EXISTS accounts (
    account_id TEXT PRIMARY KEY, tenant TEXT NOT NULL UNIQUE, currency TEXT NOT NULL, opened_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ledger_balances (
    tenant TEXT NOT NULL, ledger_account TEXT NOT NULL, unit TEXT NOT NULL, amount BIGINT NOT NULL,
    last_position BIGINT NOT NULL, PRIMARY KEY (tenant, ledger_account, unit));
CREATE TABLE IF NOT EXISTS wallet_holds (
    tenant TEXT NOT NULL, unit TEXT NOT NULL, held BIGINT NOT NULL, PRIMARY KEY (tenant, unit));
"""

TABLES = ("positions", "accounts", "ledger_balances", "wallet_holds")
