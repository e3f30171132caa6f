"""The ingest gateway: validate, deduplicate and forward usage events; learn the catalogue from the ledger.

Exactly-once without Kafka transactions: the dedup table (``dedup``) remembers each (tenant, event id),
written in the same database transaction as the batch's publish, committed after the publish. A crash
before the commit forgets the batch, which is redelivered (its offsets were not committed) and published
again; a genuine duplicate is answered ``duplicate``. Downstream, rating deduplicates by event id and the
ledger by command id, so a second publish is harmless. Nothing is lost: offsets are committed only after
the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter as Tally
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from billing_events import ids, topics
from billing_events.messages import AcceptedUsage, LedgerEvent, UsageRejection
from billing_events.timeutil import utcnow
from billing_ingest import dedup
from billing_ingest.validation import CatalogKnowledge, Invalid, MeterRules, VerifiedUsage, parse_raw, verify
from billing_runtime.bus import Bus, OutMessage, Record
from billing_runtime.db import Database
from billing_runtime.logging import get_logger
from billing_runtime.settings import Settings
from prometheus_client import Counter

log = get_logger(__name__)

EVENTS = Counter("billing_ingest_events_total", "Usage events by outcome", ["outcome"])
DEDUP_FORGOTTEN = Counter("billing_ingest_dedup_forgotten_total", "Dedup keys deleted after the window")
REJECTIONS = Counter("billing_ingest_rejections_total", "Rejected usage events by reason", ["reason"])

# A dead letter keeps the original payload up to this size (a larger one is cut and marked truncated), so
# a dead letter always fits in a Kafka message whatever arrived.
DEAD_LETTER_PAYLOAD_CHARS_MAX = 64 * 1024
# Tenants are few: the text of their account ids (message keys) is built once per tenant.
ACCOUNT_KEYS_CACHED_MAX = 65536


@lru_cache(maxsize=ACCOUNT_KEYS_CACHED_MAX)
def _account_key(tenant: str) -> str:
    """The message key of a tenant's records: its billing account id."""
    return str(ids.account_id(tenant))


_ACCEPTED_HEADERS = (("schema", b"usage.accepted/v1"),)
_REJECTED_HEADERS = (("schema", b"usage.rejected/v1"),)

SCHEMA = dedup.SCHEMA + """
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

    async def process(self, items: Sequence[tuple[bytes | object, str]]) -> list[Outcome]:
        """Validates, deduplicates and publishes a batch of raw events; ``items`` are (payload, source).

        Every item ends accepted, duplicate or rejected (with a dead letter). The dedup rows of the batch and
        its publish share one transaction that commits after the publish (see ``dedup``): one multi-row
        statement per batch, and a crash before the commit simply replays the batch.
        """
        now = utcnow()
        window = timedelta(days=self.settings.dedup_window_days)
        skew = timedelta(seconds=self.settings.future_skew_seconds)
        outcomes: list[Outcome | None] = [None] * len(items)
        rejections: list[OutMessage] = []
        first: dict[tuple[str, str], tuple[int, VerifiedUsage, str]] = {}
        for index, (payload, source) in enumerate(items):
            parsed = parse_raw(payload)
            result = parsed if isinstance(parsed, Invalid) else verify(
                parsed, self.knowledge, now=now, future_skew=skew, window=window)
            if isinstance(result, Invalid):
                outcomes[index] = Outcome("rejected", _text(result.event_id), result.reason.value,
                                          _text(result.detail))
                rejections.append(self._rejection(result, payload, source, now))
                continue
            key = (result.event.tenant, result.event.id)
            if key in first:  # a duplicate inside the batch
                outcomes[index] = Outcome("duplicate", result.event.id)
            else:
                first[key] = (index, result, source)

        if not first:
            await self.bus.publish(rejections)
        else:
            async with self.db.transaction() as conn:
                to_publish = await dedup.claim(conn, self.db.dialect, [
                    (tenant, event_id, usage.event.timestamp.isoformat())
                    for (tenant, event_id), (_, usage, _) in first.items()])
                accepted: list[OutMessage] = []
                version = self.knowledge.catalog_version
                for key, (index, usage, source) in first.items():
                    if key not in to_publish:
                        outcomes[index] = Outcome("duplicate", usage.event.id)
                        continue
                    account = ids.account_id(usage.event.tenant)
                    message = AcceptedUsage(account_id=account, event=usage.event, accepted_at=now, source=source,
                                            catalog_version=version)
                    accepted.append(OutMessage(topics.USAGE_ACCEPTED, _account_key(usage.event.tenant),
                                               message.to_json(),
                                               _ACCEPTED_HEADERS))
                    outcomes[index] = Outcome("accepted", usage.event.id)
                # Durable on the bus before the dedup rows commit: a row that exists was published.
                await self.bus.publish(accepted + rejections)
        final = [o for o in outcomes if o is not None]
        assert len(final) == len(items), "every event ends accepted, duplicate or rejected"
        for status, count in Tally(o.status for o in final).items():
            EVENTS.labels(status).inc(count)
        for reason, count in Tally(o.reason for o in final if o.reason).items():
            REJECTIONS.labels(reason).inc(count)
        return final

    def _rejection(self, invalid: Invalid, payload: bytes | object, source: str, now: datetime) -> OutMessage:
        if isinstance(payload, bytes):
            text = payload.decode("utf-8", errors="replace")
        else:
            text = _dumps_leniently(payload)
        truncated = len(text) > DEAD_LETTER_PAYLOAD_CHARS_MAX
        record = UsageRejection(reason=invalid.reason, detail=_text(invalid.detail) or "", stage="ingest",
                                tenant=_text(invalid.tenant), event_id=_text(invalid.event_id),
                                payload=_text(text[:DEAD_LETTER_PAYLOAD_CHARS_MAX]) or "",
                                payload_truncated=truncated, rejected_at=now, source=source)
        key = _account_key(record.tenant) if record.tenant else "unknown"
        return OutMessage(topics.USAGE_REJECTED, key, record.to_json(), _REJECTED_HEADERS)

    # -- dedup window cleanup ------------------------------------------------------------------------------

    async def cleanup_once(self, now: datetime | None = None) -> int:
        """Forgets keys of events older than the dedup window (bounded per run); returns rows deleted."""
        s = self.settings
        deleted = await dedup.cleanup(self.db, now or utcnow(), timedelta(days=s.dedup_window_days),
                                      s.dedup_cleanup_rows_max, s.dedup_cleanup_rows_per_run_max)
        if deleted:
            DEDUP_FORGOTTEN.inc(deleted)
            log.info("dedup_cleanup", deleted=deleted)
        return deleted

    async def cleanup_loop(self, stopping: asyncio.Event) -> None:
        """Background task: one bounded cleanup per interval until the service stops."""
        while not stopping.is_set():
            try:
                await self.cleanup_once()
            except Exception:
                log.exception("dedup_cleanup_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self.settings.dedup_cleanup_interval_seconds)

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


def _text(value: str | None) -> str | None:
    """Text that can be encoded (JSON may carry lone surrogates, which no UTF-8 message can)."""
    return None if value is None else value.encode("utf-8", errors="replace").decode("utf-8")


def _dumps_leniently(payload: Any) -> str:
    try:
        return json.dumps(payload, default=str)
    except (ValueError, RecursionError):
        return f"<{type(payload).__name__} payload that cannot be serialised>"
