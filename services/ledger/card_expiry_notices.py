"""Card expiry notices: a leader task records ``PaymentMethodExpiring`` / ``PaymentMethodExpired`` when they are due.

It follows the roster's payment-method events in the event store's notification log (added, removed, card
updated, notices recorded), keeps every saved card's expiry in memory (rebuilt from the log after a restart, as
the billing-cycle scheduler's ``DueIndex``), and each round applies ``payment_method.expiry_notice`` for each card
whose notice is due (``card_expiry.notice_due``: ``expiring`` from ``notice_days`` before the end of the expiry
month, ``expired`` after it). The command's id is derived from (tenant, method, expiry, notice) and the roster
records each notice once per expiry, so a second round, a restarted leader, or two processes at once never record
one twice. Delivering a recorded notice (email, signed webhook) is the alerts task's (``alerts.py``), which
follows those events like ``LowBalanceReached``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.card_expiry import notice_command_id, notice_due, notice_key
from billing_ledger.domain.roster import Roster
from billing_ledger.limits import CARD_EXPIRY_NOTICE_DAYS_MAX
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.persistence import IntegrityError
from eventsourcing.utils import get_topic

log = get_logger(__name__)
SCAN_BATCH_EVENTS_MAX = 1000
BY = "system:card-expiry"
# The roster events that change which cards there are, their expiry, or the notices recorded for them.
METHOD_TOPICS = [get_topic(cls) for cls in (
    Roster.PaymentMethodAdded, Roster.PaymentMethodRemoved, Roster.PaymentMethodCardUpdated,
    Roster.PaymentMethodExpiring, Roster.PaymentMethodExpired)]
Clock = Callable[[], datetime]


def _cards(roster: Any) -> tuple[str, list[tuple[str, dict[str, Any]]], frozenset[str]]:
    return (roster.tenant, [(m["method_id"], dict(m["card"])) for m in roster.payment_methods if m.get("card")],
            frozenset(roster.expiry_notices))


class CardExpiryNotices:
    """The saved cards of every account and the notices recorded for them; ``process`` runs one round."""

    def __init__(self, app: LedgerApplication, notice_days: int, *, now: Clock = utcnow) -> None:
        if isinstance(notice_days, bool) or not 0 <= notice_days <= CARD_EXPIRY_NOTICE_DAYS_MAX:
            raise ValueError(f"card_expiry_notice_days must be 0 to {CARD_EXPIRY_NOTICE_DAYS_MAX} days")
        self.app = app
        self.notice_days = notice_days
        self.now = now
        self.position = 0  # the last notification read
        # roster -> (tenant, [(method id, card)], notice keys recorded)
        self.rosters: dict[UUID, tuple[str, list[tuple[str, dict[str, Any]]], frozenset[str]]] = {}

    def _catch_up(self) -> None:
        touched: set[UUID] = set()
        while True:
            notifications, self.position = self.app.scan_notifications(self.position, SCAN_BATCH_EVENTS_MAX,
                                                                       METHOD_TOPICS)
            touched.update(n.originator_id for n in notifications)
            if len(notifications) < SCAN_BATCH_EVENTS_MAX:
                break
        for roster_id in touched:
            found = self.app.read(roster_id, _cards)
            if found is None or not found[1]:
                self.rosters.pop(roster_id, None)
            else:
                self.rosters[roster_id] = found

    def due(self, now: datetime) -> list[LedgerCommand]:
        """The notice commands due at ``now`` that the rosters have not recorded."""
        commands = []
        for tenant, cards, recorded in self.rosters.values():
            for method_id, card in cards:
                notice = notice_due(card, now, self.notice_days)
                if notice is None or notice_key(method_id, card, notice) in recorded:
                    continue
                commands.append(LedgerCommand(
                    command_id=notice_command_id(tenant, method_id, card, notice),
                    kind="payment_method.expiry_notice", tenant=tenant, issued_at=now, issued_by=BY,
                    payload={"method_id": method_id, "notice": notice, "notice_days": self.notice_days,
                             "at": now.isoformat()}))
        return commands

    def _record(self, commands: list[LedgerCommand]) -> list[dict[str, Any]]:
        recorded = []
        for command in commands:  # one per transaction: an account's conflict does not hold up the others
            try:
                [result] = self.app.apply_commands([command])
            except IntegrityError:  # another writer changed the roster first: due again next round
                log.info("card_expiry_notice_retried", tenant=command.tenant, **command.payload)
                continue
            if result.outcome == "applied" and result.value and result.value.get("recorded"):
                recorded.append({"tenant": command.tenant, **result.value})
                log.info("card_expiry_notice_recorded", tenant=command.tenant, **result.value)
        return recorded

    async def process(self) -> list[dict[str, Any]]:
        """One round: reads new payment-method events and records the notices due now; returns those recorded."""
        await asyncio.to_thread(self._catch_up)
        commands = self.due(self.now())
        if not commands:
            return []
        recorded = await asyncio.to_thread(self._record, commands)
        await asyncio.to_thread(self._catch_up)  # the notices just recorded: not due again
        return recorded


async def run_card_expiry(app: LedgerApplication, notice_days: int, stopping: asyncio.Event,
                          interval_seconds: float = 5.0, is_leader: Callable[[], Awaitable[bool]] | None = None,
                          now: Clock = utcnow) -> None:
    notices = CardExpiryNotices(app, notice_days, now=now)
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():  # one process at a time
                await notices.process()
        except OSError as exc:
            log.warning("card_expiry_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)
