"""The billing-cycle scheduler: finds subscriptions whose trial or period has ended and ticks them.

It follows the event store's notification log for Subscription events, keeps each live subscription's
next due time (trial end, or period end), and publishes ``subscription.tick`` commands whose id is derived
from (subscription, due time). Running it twice, or in two ledger processes at once, issues the same
command ids, which the ledger refuses the second time: each period is closed exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.subscription import BILLABLE, INCOMPLETE, PAUSED, TRIALING, Subscription
from billing_ledger.subscription_commands import incomplete_expires_at
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.utils import get_topic

log = get_logger(__name__)

SCAN_BATCH_EVENTS_MAX = 1000
SUBSCRIPTION_TOPICS = [get_topic(value) for value in vars(Subscription).values()
                       if isinstance(value, type) and issubclass(value, Subscription.Event)]


class DueIndex:
    """Next due time of every live subscription, built from the notification log."""

    def __init__(self) -> None:
        self.position = 0
        self.due: dict[UUID, tuple[str, str, datetime]] = {}

    def catch_up(self, app: LedgerApplication) -> None:
        touched: set[UUID] = set()
        while True:
            notifications, self.position = app.scan_notifications(self.position, SCAN_BATCH_EVENTS_MAX,
                                                                  SUBSCRIPTION_TOPICS)
            touched.update(n.originator_id for n in notifications)
            if len(notifications) < SCAN_BATCH_EVENTS_MAX:
                break
        for subscription_id in touched:
            due = app.read(subscription_id, _due)
            if due is None:
                self.due.pop(subscription_id, None)
            else:
                self.due[subscription_id] = due

    def ticks(self, now: datetime) -> list[LedgerCommand]:
        return [
            LedgerCommand(command_id=uuid5(NAMESPACE_URL, f"/ticks/{sid}/{due.isoformat()}"), kind="subscription.tick",
                          tenant=tenant, issued_at=now, issued_by="system:scheduler",
                          payload={"key": key, "at": max(now, due).isoformat()})
            for sid, (tenant, key, due) in sorted(self.due.items(), key=lambda item: item[1][2])
            if due <= now
        ]


def _due(sub: Any) -> tuple[str, str, datetime] | None:
    """When the subscription needs the scheduler next: trial end, period end, or the end of the wait for an
    incomplete one's first payment; None once canceled."""
    if sub.status == INCOMPLETE:
        return (sub.tenant, sub.key, incomplete_expires_at(sub))
    if sub.status == TRIALING and sub.trial_end is not None:
        return (sub.tenant, sub.key, sub.trial_end)
    if sub.status in BILLABLE or sub.status == PAUSED:
        return (sub.tenant, sub.key, sub.period_end)
    return None


def tick_messages(commands: list[LedgerCommand]) -> list[OutMessage]:
    return [OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(c.tenant or "")), c.to_json(),
                       (("schema", b"ledger.command/v1"),)) for c in commands]


async def run_scheduler(app: LedgerApplication, bus: Bus, stopping: asyncio.Event, *, interval_seconds: float,
                        is_leader: Any = None, clock: Callable[[], datetime] = utcnow) -> None:
    index = DueIndex()
    while not stopping.is_set():
        if is_leader is None or await is_leader():
            await asyncio.to_thread(index.catch_up, app)
            commands = index.ticks(clock())
            if commands:
                await bus.publish(tick_messages(commands))
                log.info("subscriptions_ticked", count=len(commands))
        await pause(stopping, interval_seconds)
