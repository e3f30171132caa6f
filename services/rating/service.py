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
from datetime import datetime
from decimal import Decimal
from typing import Any

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerCommand, LedgerEvent, RejectReason, UsageRejection
from billing_events.money import RATING_CONTEXT, from_subunits, to_subunits
from billing_events.timeutil import utcnow
from billing_rating.aggregation import REAL_TIME, contribution, group_key, matches, period_of
from billing_rating.catalog_view import CatalogView, MeterView, build_view
from billing_rating.charge_models import PriceSpecError, parse_spec
from billing_rating.pricing import TOKEN_CLASSES, ai_token_price, period_charge
from billing_rating.subscriptions import SCHEMA as SUBSCRIPTIONS_SCHEMA
from billing_rating.subscriptions import AccountSubscription, apply_event, load_for, usage_lines_command
from billing_runtime.bus import Bus, OutMessage, Record
from billing_runtime.db import Connection, Database
from billing_runtime.logging import get_logger
from pydantic import ValidationError

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
    corrects TEXT, effective_quantity TEXT,
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
        self._plan_specs: dict[tuple[str, int, str], Any] = {}

    async def setup(self) -> None:
        from billing_rating.close import CLOSE_SCHEMA

        await self.db.executescript(SCHEMA + CLOSE_SCHEMA + SUBSCRIPTIONS_SCHEMA)  # type: ignore[attr-defined]
        await self._load_catalog()

    async def _load_catalog(self) -> None:
        row = await self.db.fetchrow("SELECT version, document FROM catalog WHERE id = 1")
        history = {
            (r["code"], int(r["version"])): json.loads(r["content"])
            for r in await self.db.fetch("SELECT code, version, content FROM plan_versions")
        }
        if row:
            self.catalog = build_view(int(row["version"]), json.loads(row["document"]), history)
            self._plan_specs = {}

    async def handle_ledger_events(self, records: list[Record]) -> None:
        changed = False
        outputs: list[OutMessage] = []
        for record in records:
            event = LedgerEvent.model_validate_json(record.value)
            if event.type.startswith("Subscription."):
                async with self.db.transaction() as conn:
                    ended = await apply_event(conn, event)
                    if ended is not None:
                        outputs.append(await self._usage_lines(conn, ended))
                continue
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
        await self.bus.publish(outputs)

    async def _usage_lines(self, conn: Connection, ended: AccountSubscription) -> OutMessage:
        row = await conn.fetchrow("SELECT account_id, tenant FROM account_subscriptions WHERE subscription_id = $1",
                                  ended.subscription_id)
        assert row is not None
        names = {code: {"name": m.definition.name, "unit_of_measure": m.definition.unit_of_measure}
                 for code, m in self.catalog.meters.items()}
        return await usage_lines_command(conn, ended, row["tenant"], row["account_id"], names)

    def _pricing(self, subs: list[AccountSubscription], meter: MeterView) -> tuple[Any, Decimal, str, bool] | None:
        """(spec, pooled allowance, overage policy, trialing) from the plans of live subscriptions, if any."""
        chosen = None
        included = Decimal(0)
        for sub in subs:
            plan = self.catalog.plans.get((sub.plan_code, sub.plan_version))
            if plan is None:
                continue
            for charge in plan.charges:
                if charge.meter != meter.code:
                    continue
                included = RATING_CONTEXT.add(included, charge.included)
                if chosen is None:
                    chosen = (sub, charge)
        if chosen is None:
            return None
        sub, charge = chosen
        key = (sub.plan_code, sub.plan_version, meter.code)
        spec = self._plan_specs.get(key)
        if spec is None:
            spec = parse_spec(charge.price, credit_scales=self._credit_scales())
            self._plan_specs[key] = spec
        return spec, included, charge.overage_policy, sub.status == "trialing"

    def _credit_scales(self) -> dict[str, int]:
        units = self.catalog.document.get("credit_units") or {}
        return {"CREDIT": 2, **{code: int((u or {}).get("scale", 2)) for code, u in units.items()}}

    async def handle_accepted(self, records: list[Record]) -> None:
        """One batch, one transaction: a few set-wise reads, decisions in memory, then bulk writes."""
        usages: list[AcceptedUsage] = []
        for record in records:
            try:
                usages.append(AcceptedUsage.model_validate_json(record.value))
            except ValidationError as exc:
                log.error("malformed_accepted_usage", offset=record.offset, error=str(exc)[:300])
        if not usages:
            return
        outputs: list[OutMessage] = []
        async with self.db.transaction() as conn:
            batch = await _BatchState.load(conn, usages)
            for usage in usages:
                key = (str(usage.account_id), usage.event.id)
                if key in batch.decided:
                    stored = batch.decided[key]
                    if stored is not None:
                        outputs.append(stored)
                    continue
                if usage.catalog_version > self.catalog.version:
                    raise CatalogBehind(f"event needs catalogue v{usage.catalog_version}, "
                                        f"rating has v{self.catalog.version}")
                output = (self._correct(batch, usage) if usage.event.correction_of
                          else self._rate(batch, usage))
                batch.decided[key] = output
                if output is not None:
                    outputs.append(output)
            await batch.save(conn)
        await self.bus.publish(outputs)

    def _rate(self, batch: _BatchState, usage: AcceptedUsage, *, correction: tuple[str, Decimal, Decimal] | None
              = None) -> OutMessage | None:
        """Rates one event; ``correction`` = (original id, old quantity, new quantity) for an amendment."""
        event = usage.event
        account = str(usage.account_id)
        subs = batch.subscriptions.get(account, [])
        period = _period(subs, event.timestamp)
        meter = self.catalog.meters.get(event.meter)
        decision_prefix = ""
        if (account, period) in batch.closed:
            # The event's period is already invoiced: the meter's late policy decides (default next_period).
            policy = meter.definition.late_policy if meter is not None else "reject"
            if policy == "reject":
                rejection = self._rejection(usage, RejectReason.PERIOD_CLOSED, f"period {period} is closed")
                batch.record(usage, self.catalog.version, period, "", None, Decimal(0), Decimal(0), 0, None,
                             "period_closed", rejection)
                return rejection
            period = period_of(utcnow())  # billed in the open period; the event keeps its own timestamp
            decision_prefix = "late_adjustment:" if policy == "adjust" else "late:"
        decision = "priced"
        amount = 0
        unit: str | None = None
        output: OutMessage | None = None
        before = after = Decimal(0)
        group = ""
        value: str | None = None
        inputs: dict[str, Any] = {}
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
            elif meter.ai_table is not None and correction is not None:
                decision = "invalid_correction"
                output = self._rejection(usage, RejectReason.INVALID_CORRECTION,
                                         "AI token events cannot be amended; send a compensating event")
            elif meter.ai_table is not None:
                try:
                    amount, unit, before, after, inputs = self._rate_ai(batch, account, key, period, usage, meter)
                except PriceSpecError as exc:
                    decision = "no_price"
                    output = self._rejection(usage, RejectReason.NO_PRICE, str(exc))
            else:
                plan_pricing = self._pricing(subs, meter)
                spec, included, overage_policy, trialing = plan_pricing or (
                    meter.spec, definition.included, definition.overage_policy, False)
                assert spec is not None
                before = batch.total(account, key, period)
                if correction is None:
                    step = contribution(definition, event.quantity)
                else:
                    _, old, new = correction
                    step = (contribution(definition, new) if new else Decimal(0)) - contribution(definition, old)
                after = RATING_CONTEXT.add(before, step)
                batch.set_total(account, key, period, after)
                unit = spec.unit
                # The charge is period_charge(after) - period_charge(before); the batch remembers the last
                # period_charge per key so each event prices one cumulative quantity, not two.
                charged_before = batch.charged.get((account, key, period))
                if charged_before is None or charged_before[0] != before:
                    charged_before = (before, period_charge(spec, before, included))
                charged_after = period_charge(spec, after, included)
                batch.charged[(account, key, period)] = (after, charged_after)
                amount = charged_after - charged_before[1]
                inputs = {"price": spec.model_dump(mode="json") if plan_pricing else definition.price,
                          "included": str(included), "overage_policy": overage_policy,
                          "priced_by": "plan" if plan_pricing else "list_price"}
                if trialing:
                    decision, amount = "trial", 0  # recorded, not charged: nothing is billed during a trial
                if correction is not None:
                    inputs = {**inputs, "corrects": correction[0], "quantity_old": str(correction[1]),
                              "quantity_new": str(correction[2])}
            if amount != 0 and unit is not None and output is None:
                if decision_prefix:
                    inputs = {**inputs, "late": decision_prefix.rstrip(":"),
                              "original_period": period_of(event.timestamp)}
                output = self._debit(usage, unit, amount, meter, period, before, after, group, inputs)
        if decision not in ("no_price", "filtered", "trial", "invalid_correction"):
            decision = decision_prefix + decision
        batch.record(usage, self.catalog.version, period, group, value, before, after, amount, unit, decision,
                     output, corrects=correction[0] if correction else None,
                     effective_quantity=str(correction[2]) if correction else None)
        return output

    def _correct(self, batch: _BatchState, usage: AcceptedUsage) -> OutMessage | None:
        """An amendment (new quantity) or a void (quantity 0) of an earlier event: re-rated by the difference.

        The original decision stays as it was; the correction is a decision of its own whose charge is
        price(total - old + new) - price(total), posted as one more debit (or give-back when negative).
        Both show in the history. Only sum/count meters priced in real time can be corrected in place.
        """
        event = usage.event
        account = str(usage.account_id)
        original = batch.originals.get((account, event.correction_of or ""))
        if original is None:
            rejection = self._rejection(usage, RejectReason.UNKNOWN_CORRECTION,
                                        f"no rated event {event.correction_of!r} for tenant {event.tenant!r}")
            batch.record(usage, self.catalog.version, period_of(event.timestamp), "", None, Decimal(0), Decimal(0),
                         0, None, "unknown_correction", rejection)
            return rejection
        if original["meter"] != event.meter:
            rejection = self._rejection(usage, RejectReason.INVALID_CORRECTION,
                                        f"correction changes meter {original['meter']!r} to {event.meter!r}")
            batch.record(usage, self.catalog.version, original["period"], "", None, Decimal(0), Decimal(0), 0,
                         None, "invalid_correction", rejection)
            return rejection
        # The correction is rated at its original's time (its period, or the late policy if that is closed).
        old = Decimal(original["quantity"])
        at_original = usage.model_copy(update={"event": event.model_copy(update={
            "timestamp": datetime.fromisoformat(original["event_time"])})})
        batch.originals[(account, event.correction_of or "")] = {**original, "quantity": str(event.quantity)}
        return self._rate(batch, at_original, correction=(event.correction_of or "", old, event.quantity))

    def _rate_ai(self, batch: _BatchState, account: str, key: str, period: str, usage: AcceptedUsage,
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
            before_counts[token_class] = batch.total(account, f"{key}|model={model}|{token_class}", period)
            after_counts[token_class] = RATING_CONTEXT.add(before_counts[token_class], Decimal(str(raw)))
        price_after = ai_token_price(meter.ai_table, model, after_counts)
        price_before = ai_token_price(meter.ai_table, model, before_counts)
        for token_class, total in after_counts.items():
            batch.set_total(account, f"{key}|model={model}|{token_class}", period, total)
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
                "overage_policy": inputs.get("overage_policy", meter.definition.overage_policy),
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


def _in(values: list[str], first: int = 1) -> str:
    """``$1, $2, ...`` for an IN list (portable between PostgreSQL and SQLite)."""
    return ", ".join(f"${i}" for i in range(first, first + len(values)))


class _BatchState:
    """What one batch reads once and writes once: prior decisions, running totals, closed periods."""

    def __init__(self) -> None:
        self.decided: dict[tuple[str, str], OutMessage | None] = {}
        self.totals: dict[tuple[str, str, str], Decimal] = {}
        self.dirty: set[tuple[str, str, str]] = set()
        self.closed: set[tuple[str, str]] = set()
        self.charged: dict[tuple[str, str, str], tuple[Decimal, int]] = {}
        self.subscriptions: dict[str, list[AccountSubscription]] = {}
        # (account, event id) -> the decision a correction amends, with its current effective quantity.
        self.originals: dict[tuple[str, str], dict[str, Any]] = {}
        self.rows: list[tuple[Any, ...]] = []

    @classmethod
    async def load(cls, conn: Connection, usages: list[AcceptedUsage]) -> _BatchState:
        state = cls()
        accounts = sorted({str(u.account_id) for u in usages})
        event_ids = sorted({u.event.id for u in usages})
        wanted = {(str(u.account_id), u.event.id) for u in usages}
        for row in await conn.fetch(
                f"SELECT account_id, event_id, output_topic, output FROM rated_events WHERE event_id IN "
                f"({_in(event_ids)})", *event_ids):
            key = (row["account_id"], row["event_id"])
            if key in wanted:
                state.decided[key] = (OutMessage(row["output_topic"], key[0], row["output"].encode())
                                      if row["output"] else None)
        for row in await conn.fetch(
                f"SELECT account_id, meter, period, quantity FROM period_totals WHERE account_id IN "
                f"({_in(accounts)})", *accounts):
            state.totals[(row["account_id"], row["meter"], row["period"])] = Decimal(row["quantity"])
        for row in await conn.fetch(
                f"SELECT account_id, period FROM closed_periods WHERE account_id IN ({_in(accounts)})", *accounts):
            state.closed.add((row["account_id"], row["period"]))
        state.subscriptions = await load_for(conn, accounts)
        corrected = sorted({u.event.correction_of for u in usages if u.event.correction_of})
        if corrected:
            for row in await conn.fetch(
                    f"SELECT account_id, event_id, meter, period, event_time, quantity FROM rated_events "
                    f"WHERE event_id IN ({_in(corrected)}) AND corrects IS NULL", *corrected):
                state.originals[(row["account_id"], row["event_id"])] = dict(row)
            for row in await conn.fetch(
                    f"SELECT account_id, corrects, effective_quantity FROM rated_events WHERE corrects IN "
                    f"({_in(corrected)}) ORDER BY rated_at", *corrected):
                original = state.originals.get((row["account_id"], row["corrects"]))
                if original is not None:  # the latest correction is what the next one amends
                    original["quantity"] = row["effective_quantity"]
        return state

    def total(self, account: str, key: str, period: str) -> Decimal:
        return self.totals.get((account, key, period), Decimal(0))

    def set_total(self, account: str, key: str, period: str, quantity: Decimal) -> None:
        self.totals[(account, key, period)] = quantity
        self.dirty.add((account, key, period))

    def record(self, usage: AcceptedUsage, catalog_version: int, period: str, group: str, value: str | None,
               before: Decimal, after: Decimal, amount: int, unit: str | None, decision: str,
               output: OutMessage | None, *, corrects: str | None = None,
               effective_quantity: str | None = None) -> None:
        """The decision with its inputs, saved with the totals: the trace of every charge."""
        event = usage.event
        self.rows.append((
            str(usage.account_id), event.id, event.tenant, event.meter, period, group, event.timestamp.isoformat(),
            str(event.quantity), value, str(before), str(after), amount, unit, catalog_version, decision,
            output.topic if output else None, output.value.decode() if output else None, utcnow().isoformat(),
            corrects, effective_quantity))

    async def save(self, conn: Connection) -> None:
        if self.dirty:
            await conn.executemany(
                "INSERT INTO period_totals (account_id, meter, period, quantity) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (account_id, meter, period) DO UPDATE SET quantity = excluded.quantity",
                [(a, m, p, str(self.totals[(a, m, p)])) for a, m, p in sorted(self.dirty)])
        if self.rows:
            await conn.executemany(
                "INSERT INTO rated_events (account_id, event_id, tenant, meter, period, group_key, event_time, "
                "quantity, value, quantity_before, quantity_after, amount_subunits, unit, catalog_version, decision, "
                "output_topic, output, rated_at, corrects, effective_quantity) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
                self.rows)


def _period(subs: list[AccountSubscription], moment: Any) -> str:
    """The primary subscription's period containing ``moment`` (its start), else the calendar month."""
    if subs:
        primary = subs[0]
        if primary.period_start <= moment < primary.period_end:
            return primary.period_start.isoformat()
    return period_of(moment)
