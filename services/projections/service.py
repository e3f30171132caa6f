"""Projections: build read models from ``billing.ledger.events``; the query API reads only these."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from billing_events.messages import LedgerEvent
from billing_runtime.bus import Record
from billing_runtime.db import Connection, Database
from billing_runtime.logging import get_logger
from billing_projections.store import SCHEMA, TABLES

log = get_logger(__name__)

WALLET = "tenant_wallet"
RECEIVABLES = "receivables"


# Holds carry no postings (an authorisation is not a movement): (sign, field) per hold event.
_HOLD_DELTAS = {
    "BillingAccount.HoldPlaced": (1, "amount"),
    "BillingAccount.HoldCaptured": (-1, "held_amount"),
    "BillingAccount.HoldReleased": (-1, "amount"),
    "BillingAccount.HoldExpired": (-1, "amount"),
}


class ProjectionService:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA)  # type: ignore[attr-defined]

    async def drop(self) -> None:
        for table in TABLES:
            await self.db.execute(f"DROP TABLE IF EXISTS {table}")
        await self.setup()

    async def start_positions(self, topic: str, partitions: list[int]) -> dict[int, int]:
        rows = await self.db.fetch("SELECT partition, next_offset FROM positions WHERE topic = $1", topic)
        known = {int(r["partition"]): int(r["next_offset"]) for r in rows}
        # A partition never applied starts at the beginning: read models are rebuilt from the whole topic.
        return {p: known.get(p, 0) for p in partitions}

    async def handle_ledger_events(self, records: list[Record]) -> None:
        first = records[0]
        async with self.db.transaction() as conn:
            row = await conn.fetchrow("SELECT next_offset, last_position FROM positions WHERE topic = $1 "
                                      "AND partition = $2", first.topic, first.partition)
            next_offset = int(row["next_offset"]) if row else 0
            last_position = int(row["last_position"]) if row else 0
            for record in records:
                if record.offset < next_offset:
                    continue
                try:
                    event = LedgerEvent.model_validate_json(record.value)
                except ValidationError as exc:
                    log.error("malformed_ledger_event", offset=record.offset, error=str(exc)[:300])
                    continue
                if event.position <= last_position:
                    continue  # re-relayed by the ledger after a crash: already applied
                await self._apply(conn, event)
                last_position = event.position
            await conn.execute(
                "INSERT INTO positions (topic, partition, next_offset, last_position) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset, "
                "last_position = excluded.last_position",
                first.topic, first.partition, records[-1].offset + 1, last_position)

    async def _apply(self, conn: Connection, event: LedgerEvent) -> None:
        data = event.data
        if event.type.startswith("BillingAccount.") and "tenant" in data and "currency" in data:
            await conn.execute(
                "INSERT INTO accounts (account_id, tenant, currency, opened_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (account_id) DO NOTHING",
                str(event.aggregate_id), data["tenant"], data["currency"], event.recorded_at.isoformat())
        hold_delta = _HOLD_DELTAS.get(event.type)
        if hold_delta is not None:
            tenant = await self._tenant(conn, event)
            amount = -int(data[hold_delta[1]]) if hold_delta[0] < 0 else int(data[hold_delta[1]])
            await conn.execute(
                "INSERT INTO wallet_holds (tenant, unit, held) VALUES ($1, $2, $3) ON CONFLICT (tenant, unit) "
                "DO UPDATE SET held = wallet_holds.held + excluded.held", tenant, data["unit"], amount)
        postings = data.get("postings")
        if event.type.startswith("BillingAccount.") and postings:
            tenant = await self._tenant(conn, event)
            for posting in postings:
                await conn.execute(
                    "INSERT INTO ledger_balances (tenant, ledger_account, unit, amount, last_position) "
                    "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, ledger_account, unit) DO UPDATE "
                    "SET amount = ledger_balances.amount + excluded.amount, last_position = excluded.last_position",
                    tenant, posting["account"], posting["unit"], int(posting["amount"]), event.position)

    async def _tenant(self, conn: Connection, event: LedgerEvent) -> str:
        tenant = await conn.fetchval("SELECT tenant FROM accounts WHERE account_id = $1", str(event.aggregate_id))
        if tenant is None:
            raise RuntimeError(f"event {event.position} for an account the projection has not seen opened")
        return str(tenant)

    # -- queries -----------------------------------------------------------------------------------------

    async def balance(self, tenant: str) -> dict[str, Any] | None:
        account = await self.db.fetchrow("SELECT currency FROM accounts WHERE tenant = $1", tenant)
        if account is None:
            return None
        rows = await self.db.fetch(
            "SELECT ledger_account, unit, amount, last_position FROM ledger_balances WHERE tenant = $1 "
            "AND ledger_account IN ($2, $3)", tenant, WALLET, RECEIVABLES)
        holds = {r["unit"]: int(r["held"]) for r in await self.db.fetch(
            "SELECT unit, held FROM wallet_holds WHERE tenant = $1", tenant)}
        wallets: dict[str, dict[str, int]] = {}
        position = 0
        for r in rows:
            w = wallets.setdefault(r["unit"], {"balance": 0, "receivable": 0})
            if r["ledger_account"] == WALLET:
                w["balance"] += -int(r["amount"])  # the wallet is a liability: credit-negative
            else:
                w["receivable"] += int(r["amount"])
            position = max(position, int(r["last_position"]))
        return {"tenant": tenant, "currency": account["currency"], "wallets": wallets, "holds": holds,
                "position": position}
