"""The ingest gateway: validate, deduplicate and forward usage events; learn the catalogue from the ledger.

Exactly-once without Kafka transactions: the dedup table remembers each (tenant, event id) and whether
its accepted record was published. A redelivered raw record whose accepted copy may not have been
published (crash between the two) is published again; a genuine duplicate is answered ``duplicate``.
Downstream, rating deduplicates by event id and the ledger by command id, so a second publish is harmless.
Offsets are committed only after publishing, so nothing is lost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from prometheus_client import Counter

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageRejection
from billing_events.timeutil import utcnow
from billing_ingest.validation import CatalogKnowledge, Invalid, MeterRules, VerifiedUsage, parse_raw, verify
from billing_runtime.bus import Bus, OutMessage, Record
from billing_runtime.db import Database
from billing_runtime.logging import get_logger
from billing_runtime.settings import Settings

log = get_logger(__name__)

EVENTS = Counter("billing_ingest_events_total", "Usage events by outcome", ["outcome"])
REJECTIONS = Counter("billing_ingest_rejections_total", "Rejected usage events by reason", ["reason"])

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_events (
    tenant TEXT NOT NULL, event_id TEXT NOT NULL, event_time TEXT NOT NULL,
    published INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, event_id));
CREATE TABLE IF NOT EXISTS known_tenants (tenant TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS known_meters (code TEXT PRIMARY KEY, required_properties TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS catalog_state (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    status: str  # accepted | duplicate | rejected
    event_id: str | None
    reason: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        result: dict[str, str | None] = {"status": self.status, "id": self.event_id}
        if self.reason:
            result["reason"] = self.reason
            result["detail"] = self.detail
        return result


class IngestService:
    def __init__(self, settings: Settings, db: Database, bus: Bus) -> None:
        self.settings = settings
        self.db = db
        self.bus = bus
        self.knowledge = CatalogKnowledge(frozenset(), {})

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA)  # type: ignore[attr-defined]
        await self._reload_knowledge()

    async def _reload_knowledge(self) -> None:
        tenants = frozenset(r["tenant"] for r in await self.db.fetch("SELECT tenant FROM known_tenants"))
        meters = {
            r["code"]: MeterRules(r["code"], tuple(json.loads(r["required_properties"])))
            for r in await self.db.fetch("SELECT code, required_properties FROM known_meters")
        }
        version = await self.db.fetchval("SELECT version FROM catalog_state WHERE id = 1") or 0
        self.knowledge = CatalogKnowledge(tenants, meters, int(version))

    # -- usage -------------------------------------------------------------------------------------------

    async def process(self, items: Sequence[tuple[bytes | dict, str]]) -> list[Outcome]:
        """Validates, deduplicates and publishes a batch of raw events; ``items`` are (payload, source)."""
        now = utcnow()
        window = timedelta(days=self.settings.dedup_window_days)
        skew = timedelta(seconds=self.settings.future_skew_seconds)
        outcomes: list[Outcome | None] = [None] * len(items)
        rejections: list[OutMessage] = []
        verified: list[tuple[int, VerifiedUsage, str]] = []
        for index, (payload, source) in enumerate(items):
            parsed = parse_raw(payload)
            result = parsed if isinstance(parsed, Invalid) else verify(
                parsed, self.knowledge, now=now, future_skew=skew, window=window)
            if isinstance(result, Invalid):
                outcomes[index] = Outcome("rejected", result.event_id, result.reason.value, result.detail)
                rejections.append(self._rejection(result, payload, source, now))
            else:
                verified.append((index, result, source))

        accepted: list[OutMessage] = []
        newly: list[tuple[str, str]] = []
        if verified:
            async with self.db.transaction() as conn:
                in_batch: set[tuple[str, str]] = set()
                for index, usage, source in verified:
                    key = (usage.event.tenant, usage.event.id)
                    if key in in_batch:
                        outcomes[index] = Outcome("duplicate", usage.event.id)
                        continue
                    in_batch.add(key)
                    row = await conn.fetchrow(
                        "SELECT published FROM seen_events WHERE tenant = $1 AND event_id = $2", *key)
                    if row is not None and row["published"]:
                        outcomes[index] = Outcome("duplicate", usage.event.id)
                        continue
                    if row is None:
                        await conn.execute(
                            "INSERT INTO seen_events (tenant, event_id, event_time, published) "
                            "VALUES ($1, $2, $3, 0)", key[0], key[1], usage.event.timestamp.isoformat())
                    account = ids.account_id(usage.event.tenant)
                    message = AcceptedUsage(account_id=account, event=usage.event, accepted_at=now, source=source,
                                            catalog_version=self.knowledge.catalog_version)
                    accepted.append(OutMessage(topics.USAGE_ACCEPTED, str(account), message.to_json(),
                                               (("schema", b"usage.accepted/v1"),)))
                    newly.append(key)
                    outcomes[index] = Outcome("accepted", usage.event.id)
        # Durable in Kafka (or the embedded log) before we remember it as published.
        await self.bus.publish(accepted + rejections)
        if newly:
            async with self.db.transaction() as conn:
                await conn.executemany(
                    "UPDATE seen_events SET published = 1 WHERE tenant = $1 AND event_id = $2", newly)
        final = [o for o in outcomes if o is not None]
        assert len(final) == len(items), "every event ends accepted, duplicate or rejected"
        for outcome in final:
            EVENTS.labels(outcome.status).inc()
            if outcome.reason:
                REJECTIONS.labels(outcome.reason).inc()
        return final

    def _rejection(self, invalid: Invalid, payload: bytes | dict, source: str, now: object) -> OutMessage:
        if isinstance(payload, bytes):
            text = payload.decode("utf-8", errors="replace")
        else:
            text = json.dumps(payload, default=str)
        record = UsageRejection(reason=invalid.reason, detail=invalid.detail, stage="ingest", tenant=invalid.tenant,
                                event_id=invalid.event_id, payload=text, rejected_at=utcnow(), source=source)
        key = str(ids.account_id(invalid.tenant)) if invalid.tenant else "unknown"
        return OutMessage(topics.USAGE_REJECTED, key, record.to_json(), (("schema", b"usage.rejected/v1"),))

    async def handle_raw(self, records: list[Record]) -> None:
        await self.process([(r.value, f"kafka:{r.topic}:{r.partition}:{r.offset}") for r in records])

    # -- catalogue knowledge -------------------------------------------------------------------------------

    async def handle_ledger_events(self, records: list[Record]) -> None:
        changed = False
        async with self.db.transaction() as conn:
            for record in records:
                event = LedgerEvent.model_validate_json(record.value)
                if event.type.startswith("BillingAccount.") and event.type.endswith(("Opened", "Created")):
                    await conn.execute("INSERT INTO known_tenants (tenant) VALUES ($1) ON CONFLICT DO NOTHING",
                                       event.data["tenant"])
                    changed = True
                elif event.type == "Catalog.Published":
                    await conn.execute(
                        "INSERT INTO catalog_state (id, version) VALUES (1, $1) ON CONFLICT (id) DO UPDATE "
                        "SET version = excluded.version WHERE catalog_state.version < excluded.version",
                        int(event.data["version"]))
                    for meter in event.data["document"].get("meters", []):
                        await conn.execute(
                            "INSERT INTO known_meters (code, required_properties) VALUES ($1, $2) "
                            "ON CONFLICT (code) DO UPDATE SET required_properties = excluded.required_properties",
                            meter["code"], json.dumps(meter.get("required_properties", [])))
                    changed = True
        if changed:
            await self._reload_knowledge()
