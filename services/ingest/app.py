"""Wiring of the ingest service: its routes, its two consumers, the payment webhooks and the dedup cleanup."""

from __future__ import annotations

from billing_events import topics
from billing_ingest.http import body_limits, build_router, build_webhook_router
from billing_ingest.payments import PaymentWebhooks
from billing_ingest.service import IngestService
from billing_ingest.webhooks.registry import enabled_gateways
from billing_runtime.bus import Bus
from billing_runtime.db import open_database
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings


async def build(settings: Settings, bus: Bus) -> ServiceParts:
    db = await open_database("ingest", settings)
    service = IngestService(settings, db, bus)
    await service.setup()
    webhooks = PaymentWebhooks(db, bus, enabled_gateways(settings))
    await webhooks.setup()

    async def close() -> None:
        await webhooks.close()
        await db.close()

    return ServiceParts(
        name="ingest",
        routers=[build_router(service), build_webhook_router(webhooks, settings.webhook_body_bytes_max)],
        consumers=[
            ConsumerSpec(settings.group("billing-ingest"), [topics.USAGE_RAW], service.handle_raw, whole_poll=True),
            ConsumerSpec(settings.group("billing-ingest-catalog"), [topics.LEDGER_EVENTS], service.handle_ledger_events),
        ],
        tasks=[service.cleanup_loop],
        close=close,
        body_limits=body_limits(settings),
    )
