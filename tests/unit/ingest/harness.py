"""Ingest on its real embedded backends (SQLite + the durable embedded log), for unit tests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_ingest.http import body_limits, build_router, build_webhook_router
from billing_ingest.payments import PaymentWebhooks
from billing_ingest.service import IngestService
from billing_ingest.webhooks import Gateway
from billing_runtime.bus import EmbeddedBus, Record
from billing_runtime.db import SqliteDatabase
from billing_runtime.http import create_app
from billing_runtime.settings import Settings

TENANT = "acme"
METERS = [{"code": "api_calls"}, {"code": "ai_tokens", "required_properties": ["model", "operation"]}]


def catalogue_events(tenants: tuple[str, ...] = (TENANT,)) -> list[LedgerEvent]:
    now = datetime.now(UTC)
    events = [LedgerEvent(position=1, aggregate_id="00000000-0000-0000-0000-000000000001", aggregate_version=1,
                          type="Catalog.Published", recorded_at=now,
                          data={"version": 1, "document": {"meters": METERS}})]
    for i, tenant in enumerate(tenants):
        events.append(LedgerEvent(position=2 + i, aggregate_id=f"00000000-0000-0000-0000-{i + 2:012d}",
                                  aggregate_version=1, type="BillingAccount.Opened", recorded_at=now,
                                  data={"tenant": tenant, "currency": "USD"}))
    return events


class Ingest:
    """The service, its webhooks and an in-process HTTP client, all on one event loop."""

    def __init__(self, tmp_path: Path, gateways: Mapping[str, Gateway] | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings(data_dir=tmp_path)
        self.bus = EmbeddedBus(tmp_path / "bus.sqlite", partitions=2)
        self.db = SqliteDatabase(tmp_path / "ingest.sqlite")
        self.service = IngestService(self.settings, self.db, self.bus)
        self.webhooks = PaymentWebhooks(self.db, self.bus, gateways or {})
        self.app = create_app("ingest (test)", self.settings, body_limits=body_limits(self.settings))
        self.app.include_router(build_router(self.service))
        self.app.include_router(build_webhook_router(self.webhooks, self.settings.webhook_body_bytes_max))
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://ingest")

    async def start(self) -> Ingest:
        await self.bus.start()
        await self.db.connect()
        await self.service.setup()
        await self.webhooks.setup()
        learn = catalogue_events()
        await self.service.handle_ledger_events(
            [Record(topics.LEDGER_EVENTS, 0, i, None, e.to_json()) for i, e in enumerate(learn)])
        return self

    async def stop(self) -> None:
        await self.http.aclose()
        await self.webhooks.close()
        await self.db.close()
        await self.bus.stop()

    async def published(self, topic: str) -> list[dict[str, Any]]:
        return await published(self.bus, topic)

    async def published_with_keys(self, topic: str) -> list[tuple[str, dict[str, Any]]]:
        rows = await self.bus._db.fetch('SELECT key, value FROM messages WHERE topic = $1 ORDER BY "offset"', topic)
        return [(r["key"], json.loads(bytes(r["value"]))) for r in rows]


async def published(bus: EmbeddedBus, topic: str) -> list[dict[str, Any]]:
    rows = await bus._db.fetch('SELECT value FROM messages WHERE topic = $1 ORDER BY rowid', topic)
    return [json.loads(bytes(r["value"])) for r in rows]
