"""Wiring of the ledger service: command consumer, outbox relay, HTTP routes."""

from __future__ import annotations

import asyncio
from functools import partial

from billing_events import topics
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.relay import run_relay
from billing_ledger.service import LedgerService
from billing_runtime.bus import Bus
from billing_runtime.service import ConsumerSpec, ServiceParts
from billing_runtime.settings import Settings


async def build(settings: Settings, bus: Bus) -> ServiceParts:
    env = persistence_env(settings.database_url, str(settings.data_dir), settings.schema("ledger"))
    if settings.database_url:
        import asyncpg

        # eventsourcing creates its tables but not the schema that holds them.
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{settings.schema("ledger")}"')
        finally:
            await conn.close()
    app = await asyncio.to_thread(LedgerApplication, env)
    service = LedgerService(app)
    leader = None
    if settings.database_url:
        from billing_ledger.leader import AdvisoryLock

        lock = AdvisoryLock(settings.database_url, settings.schema("ledger") + "_relay")
        leader = lock.is_held
    return ServiceParts(
        name="ledger",
        consumers=[ConsumerSpec(settings.group("billing-ledger"), [topics.LEDGER_COMMANDS], service.handle_commands,
                                service.start_positions)],
        tasks=[partial(run_relay, app, bus, is_leader=leader)],
        close=lambda: asyncio.to_thread(app.close),
    )
