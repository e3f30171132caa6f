"""Wiring of the projections service."""

from __future__ import annotations

from billing_events import topics
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.bus import Bus
from billing_runtime.db import open_database
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings


async def build(settings: Settings, bus: Bus) -> ServiceParts:
    db = await open_database("projections", settings)
    service = ProjectionService(db)
    await service.setup()
    return ServiceParts(
        name="projections",
        routers=build_routers(db),
        consumers=[ConsumerSpec(settings.group("billing-projections"), [topics.LEDGER_EVENTS],
                                service.handle_ledger_events, service.start_positions)],
        close=db.close,
    )
