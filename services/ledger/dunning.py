"""Dunning: finalized, unpaid subscription invoices (and the month's credit note usage invoices, which bill the VAT of
usage paid with a credit note's credit outside subscriptions: ``credit_note_usage_commands``) are charged off-session
on a retry schedule.

A ledger background task (one leader at a time, like the auto-top-up task). It follows ``Invoice.Finalized``,
``Invoice.Paid`` and ``Invoice.Voided`` in the event store's notification log and keeps the subscription
invoices still open. Attempt ``k`` of an invoice is due ``dunning_retry_days[k]`` days after its issue
(``BILLING_DUNNING_RETRY_DAYS``, default ``0,3,5``). An attempt charges the default payment method, then each
backup in order, a card past its expiry month after the others (``charge_in_order``; the gateway's idempotency key is ``dunning/<invoice>/<k>/<method
index>``, so a repeated attempt never charges twice):

* the first success applies ``invoice.mark_paid`` with the amount charged (a past_due subscription recovers);

What is charged is the invoice's total in what its currency is charged in (``charge_of``): an invoice finalized
before session 13 with a last digit of thousandths (12.957 KWD, which Stripe and Razorpay refuse: every attempt was
a decline, the invoice past due) is charged 12.950, and its payment writes the 0.007 off
(``InvoiceChargeRounded``); one below a step (0.005 KWD) is written off whole, nothing charged.
* a *pending* charge (Stripe ``processing``: the money may still arrive) stops the attempt without trying a
  backup method (that would charge twice) and applies ``invoice.payment_pending`` (a receipt per (invoice,
  attempt)), so no later round or restart charges that attempt again, even after the gateway's idempotency key
  has expired; the gateway's webhook settles the invoice (``payment.succeeded`` naming it, see
  ``payment_commands``). A pending payment that later fails (``payment.failed``, recorded on the invoice) is
  a failed attempt at the next round: the tenant is emailed and ``invoice.payment_failed`` applied as below,
  and the next attempt follows the schedule;
* when every method declines, the tenant is emailed, then ``invoice.payment_failed`` is applied with
  ``final`` true only for the last attempt (the subscription goes past_due; an ``incomplete`` one, collection
  ``charge_before_access``, never had access: it is canceled, ``incomplete_expired``, and its invoice voided).

What is durable: each failed attempt is a command with an id derived from (invoice, attempt), so its
receipt in the event store says the attempt was made (a restart neither repeats it nor re-sends its email,
except for a crash between the email and the command: at least once). The position ``dunning:invoices`` is
a low-water mark: every invoice finalized at or before it is settled, so a restart re-reads the log from
there only. A gateway outage (``GatewayError``) leaves the invoice where it is: retried next round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.domain.invoice import FINALIZED, INVOICE, Invoice, is_credit_note_usage
from billing_ledger.domain.subscription import INCOMPLETE
from billing_ledger.gateways import GatewayError, OutboundGateway
from billing_ledger.invoice_commands import charge_of
from billing_ledger.mail import send_text, tenant_address
from billing_ledger.notifier import SmtpSettings
from billing_ledger.saved_methods import Charged, charge_in_order
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.persistence import Tracking
from eventsourcing.utils import get_topic

log = get_logger(__name__)
DUNNING_NAME = "dunning:invoices"
FINALIZED_TOPIC = get_topic(Invoice.Finalized)
CLOSED_TOPICS = frozenset({get_topic(Invoice.Paid), get_topic(Invoice.Voided)})
SCAN_BATCH_EVENTS_MAX = 500
BY = "system:dunning"
Clock = Callable[[], datetime]


def failed_command_id(invoice: UUID, attempt: int) -> UUID:
    return uuid5(NAMESPACE_URL, f"/dunning/{invoice}/{attempt}/failed")


def paid_command_id(invoice: UUID) -> UUID:
    return uuid5(NAMESPACE_URL, f"/dunning/{invoice}/paid")


def pending_command_id(invoice: UUID, attempt: int) -> UUID:
    return uuid5(NAMESPACE_URL, f"/dunning/{invoice}/{attempt}/pending")


def _invoice_view(invoice: Invoice) -> dict[str, Any]:
    return {"status": invoice.status, "tenant": invoice.tenant, "subscription_id": invoice.subscription_id,
            "document_type": invoice.document_type, "total": invoice.total, "charge": charge_of(invoice),
            "currency": invoice.currency,
            "number": invoice.number, "failed_payments": dict(invoice.failed_payments)}


class Dunning:
    """The follower and its open invoices; ``process`` runs one round (the clock is injectable)."""

    def __init__(self, app: LedgerApplication, gateways: dict[str, OutboundGateway], smtp: SmtpSettings | None,
                 retry_days: Sequence[int], *, now: Clock = utcnow) -> None:
        if not retry_days or list(retry_days) != sorted(retry_days) or min(retry_days) < 0:
            raise ValueError("dunning_retry_days must be a non-empty ascending list of days >= 0")
        self.app = app
        self.gateways = gateways
        self.smtp = smtp
        self.retry_days = tuple(retry_days)
        self.now = now
        self.position: int | None = None  # the last notification read
        self.open: dict[UUID, tuple[int, datetime]] = {}  # invoice -> (its Finalized notification, issued at)

    def _apply(self, kind: str, command_id: UUID, tenant: str, payload: dict[str, Any]) -> CommandResult:
        command = LedgerCommand(command_id=command_id, kind=kind, tenant=tenant, issued_at=self.now(),
                                issued_by=BY, payload=payload)
        [result] = self.app.apply_commands([command])
        return result

    def _scan(self) -> None:
        recorder = self.app.process_recorder
        if self.position is None:
            self.position = recorder.max_tracking_id(DUNNING_NAME) or 0
        topics = [FINALIZED_TOPIC, *sorted(CLOSED_TOPICS)]
        while True:
            notifications, scanned_to = self.app.scan_notifications(self.position, SCAN_BATCH_EVENTS_MAX, topics)
            for notification in notifications:
                if notification.topic == FINALIZED_TOPIC:
                    event: Any = self.app.mapper.to_domain_event(notification)
                    # A subscription's invoice, or a month's credit note usage invoice (its tax is owed alike).
                    kind = self.app.read(notification.originator_id,
                                         lambda i: (i.document_type, bool(i.subscription_id) or is_credit_note_usage(i)))
                    if kind == (INVOICE, True):
                        self.open[notification.originator_id] = (notification.id, event.issued_at)
                else:
                    self.open.pop(notification.originator_id, None)
                self.position = notification.id
            self.position = scanned_to
            if len(notifications) < SCAN_BATCH_EVENTS_MAX:
                return

    def _attempts_made(self, invoice: UUID) -> int:
        made = 0
        while made < len(self.retry_days) and self.app.read(failed_command_id(invoice, made), lambda r: True):
            made += 1
        return made

    def _record_position(self) -> None:
        assert self.position is not None
        mark = min((n for n, _ in self.open.values()), default=self.position + 1) - 1
        recorder = self.app.process_recorder
        if mark > (recorder.max_tracking_id(DUNNING_NAME) or 0):
            recorder.insert_tracking(Tracking(DUNNING_NAME, mark))

    async def process(self) -> dict[str, str]:
        """One round: reads new invoice events, makes the attempts that are due; returns invoice -> outcome."""
        await asyncio.to_thread(self._scan)
        outcomes: dict[str, str] = {}
        try:
            for invoice, (_, issued_at) in sorted(self.open.items(), key=lambda item: item[1]):
                outcome = await self._dun(invoice, issued_at)
                if outcome != "waiting":
                    outcomes[str(invoice)] = outcome
                if outcome not in ("waiting", "retry", "pending"):
                    self.open.pop(invoice, None)
        finally:
            await asyncio.to_thread(self._record_position)
        return outcomes

    async def _dun(self, invoice: UUID, issued_at: datetime) -> str:
        view = await asyncio.to_thread(self.app.read, invoice, _invoice_view)
        if view is None or view["status"] != FINALIZED:
            return "closed"
        if view["total"] <= 0:
            return "nothing_due"
        made = await asyncio.to_thread(self._attempts_made, invoice)
        if made >= len(self.retry_days):
            return "exhausted"
        now = self.now()
        if now < issued_at + timedelta(days=self.retry_days[made]):
            return "waiting"
        tenant, total, code = view["tenant"], view["charge"], view["currency"]
        if total <= 0:  # finalized before session 13 below one step of its currency (0.005 KWD): written off
            result = await asyncio.to_thread(self._apply, "invoice.mark_paid", paid_command_id(invoice), tenant, {
                "invoice_id": str(invoice), "payment": "", "amount": str(total), "at": now.isoformat()})
            log.info("dunning_written_off", tenant=tenant, invoice=view["number"], outcome=result.outcome)
            return "written_off"
        if await asyncio.to_thread(self.app.read, pending_command_id(invoice, made), lambda r: True):
            failed = view["failed_payments"].get(str(made + 1))
            if failed is None:
                return "waiting"  # a payment of this attempt is under way: its webhook settles the invoice
            # The gateway reported the pending payment failed (``payment.failed``): the attempt failed.
            charged = Charged(None, None, None, [f"payment {failed} failed after it was pending"])
        else:
            charged = await charge_in_order(self.app, self.gateways, tenant=tenant, total=total, currency_code=code,
                                            key_prefix=f"dunning/{invoice}/{made}", order_ref=str(invoice),
                                            invoice_ref=str(invoice), now=now)
        if charged.pending is not None:
            result = await asyncio.to_thread(
                self._apply, "invoice.payment_pending", pending_command_id(invoice, made), tenant, {
                    "invoice_id": str(invoice), "payment": charged.pending.reference or "", "attempt": made + 1,
                    "at": now.isoformat()})
            log.info("dunning_payment_pending", tenant=tenant, invoice=view["number"], attempt=made + 1,
                     method_index=charged.method_index, outcome=result.outcome)
            return "pending"
        if charged.charge is not None:
            result = await asyncio.to_thread(self._apply, "invoice.mark_paid", paid_command_id(invoice), tenant, {
                "invoice_id": str(invoice), "payment": charged.charge.reference or "", "amount": str(total),
                "at": now.isoformat()})
            log.info("dunning_paid", tenant=tenant, invoice=view["number"], attempt=made + 1,
                     method_index=charged.method_index, outcome=result.outcome)
            return "paid"
        final = made + 1 == len(self.retry_days)
        incomplete = final and bool(view["subscription_id"]) and bool(await asyncio.to_thread(
            self.app.read, UUID(view["subscription_id"]), lambda s: s.status == INCOMPLETE))
        if incomplete:
            then = "The subscription was never started and this invoice is void; subscribe again to start it.\n"
        elif final and view["subscription_id"]:
            then = "The subscription is now past due; pay the invoice to restore it.\n"
        elif final:
            then = "Please pay the invoice (its due date is on it); we will not try this payment again.\n"
        else:
            then = f"We will try again on {(issued_at + timedelta(days=self.retry_days[made + 1])).date()}.\n"
        await asyncio.to_thread(
            send_text, self.smtp, tenant_address(self.smtp, tenant),
            f"Payment failed: invoice {view['number']}" + (" (final attempt)" if final else ""),
            f"We could not collect {total} {code} for invoice {view['number']} "
            f"(attempt {made + 1} of {len(self.retry_days)}):\n" + "\n".join(charged.errors) + "\n" + then)
        result = await asyncio.to_thread(self._apply, "invoice.payment_failed", failed_command_id(invoice, made),
                                         tenant, {"invoice_id": str(invoice), "final": final, "attempt": made + 1,
                                                  "at": now.isoformat()})
        log.info("dunning_attempt_failed", tenant=tenant, invoice=view["number"], attempt=made + 1, final=final,
                 outcome=result.outcome)
        if not final:
            return "retry"
        return "incomplete_expired" if incomplete else "past_due" if view["subscription_id"] else "exhausted"


async def run_dunning(app: LedgerApplication, gateways: dict[str, OutboundGateway], smtp: SmtpSettings | None,
                      retry_days: Sequence[int], stopping: asyncio.Event, interval_seconds: float = 5.0,
                      is_leader: Callable[[], Awaitable[bool]] | None = None, now: Clock = utcnow) -> None:
    dunning = Dunning(app, gateways, smtp, retry_days, now=now)
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():  # one process at a time
                await dunning.process()
        except (GatewayError, OSError) as exc:
            log.warning("dunning_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)
