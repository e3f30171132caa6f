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
from decimal import Decimal
from typing import Any

from pydantic import ValidationError

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerCommand, LedgerEvent, RejectReason, UsageRejection
from billing_events.money import RATING_CONTEXT, from_subunits, to_subunits
from billing_events.timeutil import utcnow
from billing_rating.aggregation import REAL_TIME, contribution, group_key, matches, period_of
from billing_rating.catalog_view import CatalogView, MeterView, build_view
from billing_rating.charge_models import PriceSpecError
from billing_rating.pricing import TOKEN_CLASSES, ai_token_price, incremental_charge
from billing_runtime.bus import Bus, OutMessage, Record
from billing_runtime.db import Connection, Database
from billing_runtime.logging import get_logger

log = get_logger(__name__)

# Token counts of an AI usage event: properties ``input_tokens``, ``output_tokens``, ``cached_input_tokens``.
TOKEN_PROPERTIES = {f"{c}_tokens": c for c in TOKEN_CLASSES}

SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS plan_versions (
    code TEXT NOT NULL, version INTEGER NOT NULL, content TEXT NOT NULL, PRIMARY KEY (code, version));
CREATE TABLE IF NOT EXISTS period_totals (
    account_id TEXT NOT NULL, meter TEXT NOT NULL, period TEXT NOT NULL, quantity TEXT NOT NULL,
    PRIMARY KEY (account_id, meter, period));
CREATE TABLE IF NOT EXISTS rated_events (
    account_id TEXT NOT NULL, event_id TEXT NOT NULL, tenant TEXT NOT NULL, meter TEXT NOT NULL,
    period TEXT NOT NULL, group_key TEXT NOT NULL, event_time TEXT NOT NULL, quantity TEXT NOT NULL,
    value TEXT, quantity_before TEXT NOT NULL, quantity_after TEXT NOT NULL,
    amount_subunits BIGINT NOT NULL, unit TEXT, catalog_version INTEGER NOT NULL,
    decision TEXT NOT NULL, output_topic TEXT, output TEXT, rated_at TEXT NOT NULL,
    PRIMARY KEY (account_id, event_id));
CREATE INDEX IF NOT EXISTS rated_events_period ON rated_events (period, account_id, meter);
"""


class CatalogBehind(RuntimeError):
    """Ingest validated against a newer catalogue than rating has seen yet: retry, never mis-rate."""


class RatingService:
    def __init__(self, db: Database, bus: Bus) -> None:
        self.db = db
        self.bus = bus
        self.catalog = CatalogView()

    async def setup(self) -> None:
        from billing_rating.close import CLOSE_SCHEMA

        await self.db.executescript(SCHEMA + CLOSE_SCHEMA)  # type: ignore[attr-defined]
        await self._load_catalog()

    async def _load_catalog(self) -> None:
        row = await self.db.fetchrow("SELECT version, document FROM catalog WHERE id = 1")
        history = {
            (r["code"], int(r["version"])): json.loads(r["content"])
            for r in await self.db.fetch("SELECT code, version, content FROM plan_versions")
        }
        if row:
            self.catalog = build_view(int(row["version"]), json.loads(row["document"]), history)

    async def handle_ledger_events(self, records: list[Record]) -> None:
        changed = False
        for record in records:
            event = LedgerEvent.model_validate_json(record.value)
            if event.type != "Catalog.Published":
                continue
            version = int(event.data["version"])
            if version <= self.catalog.version:
                continue
            document = event.data["document"]
            async with self.db.transaction() as conn:
                await conn.execute(
                    "INSERT INTO catalog (id, version, document) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE "
                    "SET version = excluded.version, document = excluded.document", version, json.dumps(document))
                for plan in document.get("plans", []):
                    content = {k: v for k, v in plan.items() if k != "version"}
                    await conn.execute(
                        "INSERT INTO plan_versions (code, version, content) VALUES ($1, $2, $3) "
                        "ON CONFLICT (code, version) DO NOTHING", plan["code"], int(plan["version"]),
                        json.dumps({**content, "version": plan["version"]}))
            changed = True
        if changed:
            await self._load_catalog()
            log.info("catalog_loaded", version=self.catalog.version, meters=len(self.catalog.meters))

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

    async def _total(self, conn: Connection, account: str, key: str, period: str) -> Decimal:
        value = await conn.fetchval(
            "SELECT quantity FROM period_totals WHERE account_id = $1 AND meter = $2 AND period = $3",
            account, key, period)
        return Decimal(value) if value is not None else Decimal(0)

    async def _set_total(self, conn: Connection, account: str, key: str, period: str, quantity: Decimal) -> None:
        await conn.execute(
            "INSERT INTO period_totals (account_id, meter, period, quantity) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
            account, key, period, str(quantity))

    async def _rate(self, conn: Connection, usage: AcceptedUsage) -> list[OutMessage]:
        event = usage.event
        account = str(usage.account_id)
        period = period_of(event.timestamp)
        meter = self.catalog.meters.get(event.meter)
        decision = "priced"
        amount = 0
        unit: str | None = None
        output: OutMessage | None = None
        before = after = Decimal(0)
        group = ""
        value: str | None = None
        inputs: dict[str, Any] = {}
        late = await conn.fetchval("SELECT closed_at FROM closed_periods WHERE period = $1 AND account_id = $2",
                                   period, account)
        if late is not None:
            # The event's period is already invoiced: the meter's late policy decides (default next_period).
            policy = meter.definition.late_policy if meter is not None else "reject"
            if policy == "reject":
                output = self._rejection(usage, RejectReason.PERIOD_CLOSED, f"period {period} is closed")
                await self._record(conn, usage, period, "", None, Decimal(0), Decimal(0), 0, None, "period_closed",
                                   output)
                return [output]
            period = period_of(utcnow())  # billed in the open period; the event keeps its own timestamp
            decision_prefix = "late_adjustment:" if policy == "adjust" else "late:"
        else:
            decision_prefix = ""
        if meter is None or meter.error:
            decision = "no_price"
            detail = meter.error if meter else f"meter {event.meter!r} is not in catalogue v{self.catalog.version}"
            output = self._rejection(usage, RejectReason.NO_PRICE, detail or "no price")
        elif not matches(meter.definition, event.properties):
            decision = "filtered"
        else:
            definition = meter.definition
            group = group_key(definition, event.properties)
            if definition.value_property:
                value = str(event.properties.get(definition.value_property, "")) or None
            key = f"{event.meter}{'|' + group if group else ''}"
            if definition.aggregation not in REAL_TIME:
                decision = "deferred_to_close"
            elif meter.ai_table is not None:
                try:
                    amount, unit, before, after, inputs = await self._rate_ai(conn, account, key, period, usage,
                                                                               meter)
                except PriceSpecError as exc:
                    decision = "no_price"
                    output = self._rejection(usage, RejectReason.NO_PRICE, str(exc))
            else:
                assert meter.spec is not None
                before = await self._total(conn, account, key, period)
                after = RATING_CONTEXT.add(before, contribution(definition, event.quantity))
                await self._set_total(conn, account, key, period, after)
                unit = meter.spec.unit
                amount = incremental_charge(meter.spec, before, after, definition.included)
                inputs = {"price": definition.price, "included": str(definition.included)}
            if amount != 0 and unit is not None and output is None:
                if decision_prefix:
                    inputs = {**inputs, "late": decision_prefix.rstrip(":"), "original_period": period_of(
                        event.timestamp)}
                output = self._debit(usage, unit, amount, meter, period, before, after, group, inputs)
        await self._record(conn, usage, period, group, value, before, after, amount, unit,
                           decision if decision in ("no_price", "filtered") else decision_prefix + decision, output)
        return [output] if output else []

    async def _record(self, conn: Connection, usage: AcceptedUsage, period: str, group: str, value: str | None,
                      before: Decimal, after: Decimal, amount: int, unit: str | None, decision: str,
                      output: OutMessage | None) -> None:
        """The decision with its inputs, in the same transaction as the totals: the trace of every charge."""
        event = usage.event
        await conn.execute(
            "INSERT INTO rated_events (account_id, event_id, tenant, meter, period, group_key, event_time, quantity, "
            "value, quantity_before, quantity_after, amount_subunits, unit, catalog_version, decision, "
            "output_topic, output, rated_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
            str(usage.account_id), event.id, event.tenant, event.meter, period, group, event.timestamp.isoformat(),
            str(event.quantity), value, str(before), str(after), amount, unit, self.catalog.version, decision,
            output.topic if output else None, output.value.decode() if output else None, utcnow().isoformat())

    async def _rate_ai(self, conn: Connection, account: str, key: str, period: str, usage: AcceptedUsage,
                       meter: MeterView) -> tuple[int, str, Decimal, Decimal, dict[str, Any]]:
        """Per model and token class, the cumulative price of the period after minus before."""
        assert meter.ai_table is not None
        event = usage.event
        model = str(event.properties.get("model", ""))
        counts = {cls: event.properties[prop] for prop, cls in TOKEN_PROPERTIES.items() if prop in event.properties}
        if not counts:
            counts = {"input": str(event.quantity)}  # a bare token count is input tokens
        before_counts: dict[str, Decimal] = {}
        after_counts: dict[str, Decimal] = {}
        for token_class, raw in counts.items():
            class_key = f"{key}|model={model}|{token_class}"
            before_counts[token_class] = await self._total(conn, account, class_key, period)
            after_counts[token_class] = RATING_CONTEXT.add(before_counts[token_class], Decimal(str(raw)))
        price_after = ai_token_price(meter.ai_table, model, after_counts)
        price_before = ai_token_price(meter.ai_table, model, before_counts)
        for token_class, total in after_counts.items():
            await self._set_total(conn, account, f"{key}|model={model}|{token_class}", period, total)
        amount = to_subunits(price_after.amount) - to_subunits(price_before.amount)
        inputs = {"ai_prices": meter.definition.ai_prices, "model": model,
                  "tokens": {c: str(v) for c, v in counts.items()},
                  "tokens_before": {c: str(v) for c, v in before_counts.items()}}
        before = sum(before_counts.values(), Decimal(0))
        after = sum(after_counts.values(), Decimal(0))
        return amount, meter.ai_table.unit, before, after, inputs

    def _debit(self, usage: AcceptedUsage, unit: str, amount: int, meter: MeterView, period: str,
               before: Decimal, after: Decimal, group: str, inputs: dict[str, Any]) -> OutMessage:
        event = usage.event
        properties = {k: str(v) for k, v in event.properties.items()}
        command = LedgerCommand(
            command_id=ids.usage_command_id(event.tenant, event.id), kind="usage.debit", tenant=event.tenant,
            issued_at=utcnow(), issued_by="service:rating",
            payload={
                "unit": unit, "amount_subunits": amount, "amount": str(from_subunits(amount)),
                "meter": event.meter, "at": event.timestamp.isoformat(),
                "overage_policy": meter.definition.overage_policy,
                "cause": {
                    "event_ids": [event.id], "period": period, "quantity": str(event.quantity),
                    "quantity_before": str(before), "quantity_after": str(after), "group": group,
                    "usage_type": meter.definition.usage_type or event.meter,
                    "catalog_version": self.catalog.version, **inputs,
                    "properties": properties, "user": properties.get("user"),
                    "model": properties.get("model"), "operation": properties.get("operation"),
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
