"""Wiring of the ingest service: its routes and its two consumers."""

from __future__ import annotations

from billing_events import topics
from billing_ingest.http import build_router
from billing_ingest.service import IngestService
from billing_runtime.bus import Bus
from billing_runtime.db import open_database
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings


async def build(settings: Settings, bus: Bus) -> ServiceParts:
    db = await open_database("ingest", settings)
    service = IngestService(settings, db, bus)
    await service.setup()
    return ServiceParts(
        name="ingest",
        routers=[build_router(service)],
        consumers=[
            ConsumerSpec(settings.group("billing-ingest"), [topics.USAGE_RAW], service.handle_raw),
            ConsumerSpec(settings.group("billing-ingest-catalog"), [topics.LEDGER_EVENTS], service.handle_ledger_events),
        ],
        close=db.close,
    )
