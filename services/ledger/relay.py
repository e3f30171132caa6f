"""The outbox relay: every recorded event goes to ``billing.ledger.events`` in recorded order, at least once.

The event store's notification log *is* the outbox. The relay reads it from its last published position,
publishes (acks=all), then records its position as a Tracking row (``relay:<topic>``). A crash between the
two re-publishes a tail of events; each carries its ``position`` so consumers drop the repeats. Only one
relay runs per store: on PostgreSQL several ledger processes elect it with an advisory lock.
"""

from __future__ import annotations

import asyncio
from typing import Any

from billing_events import topics
from billing_events.messages import LedgerEvent
from billing_ledger.application import LedgerApplication, jsonable
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.logging import get_logger
from eventsourcing.persistence import Tracking

log = get_logger(__name__)

RELAY_BATCH_EVENTS_MAX = 1000
RELAY_IDLE_SLEEP_SECONDS = 0.05
RELAY_NAME = f"relay:{topics.LEDGER_EVENTS}"

_ORIGINATOR_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def to_message(app: LedgerApplication, notification: Any) -> OutMessage:
    domain_event = app.mapper.to_domain_event(notification)
    qualname = type(domain_event).__qualname__
    data = {k: jsonable(v) for k, v in vars(domain_event).items() if k not in _ORIGINATOR_FIELDS}
    tenant = data.get("tenant") if isinstance(data.get("tenant"), str) else None
    envelope = LedgerEvent(
        position=notification.id, aggregate_id=domain_event.originator_id,
        aggregate_version=domain_event.originator_version, type=qualname, tenant=tenant,
        recorded_at=domain_event.timestamp, data=data,
    )
    # ``type`` lets consumers that need a few kinds of events (ingest's and rating's catalogue followers)
    # skip the rest without decoding them.
    return OutMessage(topics.LEDGER_EVENTS, str(domain_event.originator_id), envelope.to_json(),
                      (("schema", b"ledger.event/v1"), ("position", str(notification.id).encode()),
                       ("type", qualname.encode())))


async def run_relay(app: LedgerApplication, bus: Bus, stopping: asyncio.Event,
                    is_leader: Any = None) -> None:
    recorder = app.process_recorder
    while not stopping.is_set():
        if is_leader is not None and not await is_leader():
            await asyncio.sleep(1.0)
            continue
        last = await asyncio.to_thread(recorder.max_tracking_id, RELAY_NAME) or 0
        notifications = await asyncio.to_thread(
            recorder.select_notifications, last + 1, RELAY_BATCH_EVENTS_MAX)
        if not notifications:
            await asyncio.sleep(RELAY_IDLE_SLEEP_SECONDS)
            continue
        messages = [to_message(app, n) for n in notifications]
        await bus.publish(messages)
        await asyncio.to_thread(recorder.insert_tracking, Tracking(RELAY_NAME, notifications[-1].id))
        log.debug("relayed", events=len(messages), position=notifications[-1].id)
