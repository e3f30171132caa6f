"""Rating: prices each accepted usage event in real time and asks the ledger to post the charge.

The charge of an event is price(cumulative quantity of the period after it) - price(before it), so
graduated, volume and stairstep prices stay exact mid-period, and the increments of a period always add up
to the price of its total. Each decision is stored with its inputs (event id, catalogue version, quantities
before/after, price spec) together with the ledger command it produced, in one transaction with the
period totals. A redelivered event finds its decision and re-publishes the same command (same id, so the
ledger refuses it if it already has it): exactly-once without Kafka transactions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerCommand, LedgerEvent, RejectReason, UsageRejection
from billing_events.money import RATING_CONTEXT, from_subunits, parse_decimal
from billing_events.timeutil import utcnow
from billing_rating.charge_models import PriceSpecError, parse_spec
from billing_rating.pricing import incremental_charge
from billing_runtime.bus import Bus, OutMessage, Record
from billing_runtime.db import Database
from billing_runtime.logging import get_logger

log = get_logger(__name__)

# Aggregations whose per-event increment is well defined; max/last/unique_count are priced at period close.
REAL_TIME_AGGREGATIONS = frozenset({"sum", "count"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS period_totals (
    account_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, quantity TEXT NOT NULL,
    PRIMARY KEY (account_id, meter, period));
CREATE TABLE IF NOT EXISTS rated_events (
    account_id TEXT NOT NULL, event_id TEXT NOT NULL, tenant TEXT NOT NULL, meter TEXT NOT NULL,
    period TEXT NOT NULL, quantity TEXT NOT NULL, quantity_before TEXT NOT NULL, quantity_after TEXT NOT NULL,
    amount_subunits BIGINT NOT NULL, unit TEXT, catalog_version INTEGER NOT NULL,
    decision TEXT NOT NULL, output_topic TEXT, output TEXT, rated_at TEXT NOT NULL,
    PRIMARY KEY (account_id, event_id));
"""


class CatalogBehind(RuntimeError):
    """Ingest validated against a newer catalogue than rating has seen yet: retry, never mis-rate."""


@dataclass(frozen=True)
class CatalogView:
    version: int
    meters: dict[str, dict[str, Any]]
    # Parsed once per catalogue version: a spec, or the error that makes the meter unpriceable.
    specs: dict[str, Any] = field(default_factory=dict)
    allowances: dict[str, Decimal] = field(default_factory=dict)


def build_view(version: int, document: dict[str, Any]) -> CatalogView:
    scales = {code: int((spec or {}).get("scale", 2)) for code, spec in (document.get("credit_units") or {}).items()}
    meters = {m["code"]: m for m in document.get("meters", [])}
    specs: dict[str, Any] = {}
    allowances: dict[str, Decimal] = {}
    for code, meter in meters.items():
        if "price" in meter:
            try:
                specs[code] = parse_spec(meter["price"], credit_scales={"CREDIT": 2, **scales})
            except PriceSpecError as exc:
                specs[code] = exc
        allowances[code] = parse_decimal(meter.get("included", "0"), field="included")
    return CatalogView(version, meters, specs, allowances)


class RatingService:
    def __init__(self, db: Database, bus: Bus) -> None:
        self.db = db
        self.bus = bus
        self.catalog = CatalogView(0, {})

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA)  # type: ignore[attr-defined]
        row = await self.db.fetchrow("SELECT version, document FROM catalog WHERE id = 1")
        if row:
            self._set_catalog(int(row["version"]), json.loads(row["document"]))

    def _set_catalog(self, version: int, document: dict[str, Any]) -> None:
        self.catalog = build_view(version, document)

    async def handle_ledger_events(self, records: list[Record]) -> None:
        for record in records:
            event = LedgerEvent.model_validate_json(record.value)
            if event.type != "Catalog.Published":
                continue
            version = int(event.data["version"])
            if version <= self.catalog.version:
                continue
            document = event.data["document"]
            await self.db.execute(
                "INSERT INTO catalog (id, version, document) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE "
                "SET version = excluded.version, document = excluded.document", version, json.dumps(document))
            self._set_catalog(version, document)
            log.info("catalog_loaded", version=version, meters=len(self.catalog.meters))

    async def handle_accepted(self, records: list[Record]) -> None:
        outputs: list[OutMessage] = []
        async with self.db.transaction() as conn:
            for record in records:
                try:
                    usage = AcceptedUsage.model_validate_json(record.value)
                except ValidationError as exc:
                    log.error("malformed_accepted_usage", offset=record.offset, error=str(exc)[:300])
                    continue
                account = str(usage.account_id)
                stored = await conn.fetchrow(
                    "SELECT output_topic, output FROM rated_events WHERE account_id = $1 AND event_id = $2",
                    account, usage.event.id)
                if stored is not None:
                    if stored["output"]:
                        outputs.append(OutMessage(stored["output_topic"], account, stored["output"].encode()))
                    continue
                if usage.catalog_version > self.catalog.version:
                    raise CatalogBehind(f"event needs catalogue v{usage.catalog_version}, "
                                        f"rating has v{self.catalog.version}")
                outputs.extend(await self._rate(conn, usage))
        await self.bus.publish(outputs)

    async def _rate(self, conn: Any, usage: AcceptedUsage) -> list[OutMessage]:
        event = usage.event
        account = str(usage.account_id)
        period = event.timestamp.strftime("%Y-%m")
        meter = self.catalog.meters.get(event.meter)
        quantity = Decimal(1) if meter and meter.get("aggregation") == "count" else event.quantity
        before = Decimal(await conn.fetchval(
            "SELECT quantity FROM period_totals WHERE account_id = $1 AND meter = $2 AND period = $3",
            account, event.meter, period) or "0")
        after = RATING_CONTEXT.add(before, quantity)
        await conn.execute(
            "INSERT INTO period_totals (account_id, meter, period, quantity) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
            account, event.meter, period, str(after))

        amount = 0
        unit: str | None = None
        decision = "priced"
        output: OutMessage | None = None
        if meter is None or "price" not in meter:
            decision = "no_price"
            output = self._rejection(usage, RejectReason.NO_PRICE, f"meter {event.meter!r} has no price")
        elif meter.get("aggregation", "sum") not in REAL_TIME_AGGREGATIONS:
            decision = "deferred_to_close"
        else:
            spec = self.catalog.specs[event.meter]
            if isinstance(spec, PriceSpecError):
                decision = "no_price"
                output = self._rejection(usage, RejectReason.NO_PRICE, f"price of {event.meter!r}: {spec}")
            else:
                unit = spec.unit
                allowance = self.catalog.allowances[event.meter]
                amount = incremental_charge(spec, before, after, allowance)
                if amount != 0:
                    output = self._debit(usage, unit, amount, meter, period, before, after)
        await conn.execute(
            "INSERT INTO rated_events (account_id, event_id, tenant, meter, period, quantity, quantity_before, "
            "quantity_after, amount_subunits, unit, catalog_version, decision, output_topic, output, rated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            account, event.id, event.tenant, event.meter, period, str(quantity), str(before), str(after), amount,
            unit, self.catalog.version, decision, output.topic if output else None,
            output.value.decode() if output else None, utcnow().isoformat())
        return [output] if output else []

    def _debit(self, usage: AcceptedUsage, unit: str, amount: int, meter: dict[str, Any], period: str,
               before: Decimal, after: Decimal) -> OutMessage:
        event = usage.event
        command = LedgerCommand(
            command_id=ids.usage_command_id(event.tenant, event.id), kind="usage.debit", tenant=event.tenant,
            issued_at=utcnow(), issued_by="service:rating",
            payload={
                "unit": unit, "amount_subunits": amount, "amount": str(from_subunits(amount)),
                "meter": event.meter, "at": event.timestamp.isoformat(),
                "overage_policy": meter.get("overage_policy", "overage"),
                "cause": {
                    "event_ids": [event.id], "period": period, "quantity": str(event.quantity),
                    "quantity_before": str(before), "quantity_after": str(after),
                    "catalog_version": self.catalog.version, "price": meter["price"],
                    "properties": {k: str(v) for k, v in event.properties.items()},
                    "user": str(event.properties.get("user")) if "user" in event.properties else None,
                },
            },
        )
        return OutMessage(topics.LEDGER_COMMANDS, str(usage.account_id), command.to_json(),
                          (("schema", b"ledger.command/v1"),))

    def _rejection(self, usage: AcceptedUsage, reason: RejectReason, detail: str) -> OutMessage:
        record = UsageRejection(reason=reason, detail=detail, stage="rating", tenant=usage.event.tenant,
                                event_id=usage.event.id, payload=usage.event.model_dump_json(),
                                rejected_at=utcnow(), source=usage.source)
        return OutMessage(topics.USAGE_REJECTED, str(usage.account_id), record.to_json(),
                          (("schema", b"usage.rejected/v1"),))
