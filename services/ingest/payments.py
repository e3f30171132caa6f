"""Payment webhooks, gateway-independent: refuse replays, confirm with the gateway, publish one
``PaymentNotification`` per money movement to ``billing.payments`` (key: billing account id).

Two tables in ingest's own schema:

* ``notified_payments(gateway, kind, reference)``: one row per money movement with the exact notification
  message, written (unpublished) before the publish and marked published after it. Every publish of a
  movement sends that stored message, so whatever happens -- a crash between publish and mark, the gateway's
  retry, another event announcing the same movement (Stripe's checkout.session.completed and
  payment_intent.succeeded) -- the bus only ever carries byte-identical copies of one notification
  (same gateway event id), which the ledger deduplicates by its command id.
* ``webhook_events(gateway, replay_key)``: every event whose processing finished (published, already
  notified, ignored), written with the mark. A second delivery of the same key is refused with 409 before
  the gateway's API is even called. A crash before the mark leaves no row: the gateway's retry is processed
  and re-publishes the stored message.

A webhook the gateway does not confirm records nothing, so the gateway's retry re-checks it.

A saved card's update (``ConfirmedCardUpdate``: no money moves) is published as a ``payment_method.card_update``
ledger command on ``billing.ledger.commands`` (key: the billing account id), and a deleted gateway customer
(``ConfirmedCustomerDeleted``, since session 15) as ``payment_customer.deleted``, each id derived from the gateway's
event, then the event is marked. A crash in between lets the gateway's retry publish it again: the same command
id, which the ledger applies once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from billing_events import ids, topics
from billing_events.timeutil import isoformat, utcnow
from billing_ingest.webhooks import (
    ConfirmedCardUpdate,
    ConfirmedCommand,
    ConfirmedCustomerDeleted,
    ConfirmedPayment,
    Gateway,
    GatewayUnavailable,
    Ignored,
    NotConfirmed,
    Refused,
    VerifiedEvent,
)
from billing_runtime.bus import Bus, OutMessage
from billing_runtime.db import Database
from billing_runtime.logging import get_logger
from prometheus_client import Counter

log = get_logger(__name__)

WEBHOOKS = Counter("billing_ingest_webhooks_total", "Payment webhooks by gateway and outcome",
                   ["gateway", "outcome"])

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_events (
    gateway TEXT NOT NULL, replay_key TEXT NOT NULL, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
    outcome TEXT NOT NULL, reference TEXT, received_at TEXT NOT NULL,
    PRIMARY KEY (gateway, replay_key));
CREATE TABLE IF NOT EXISTS notified_payments (
    gateway TEXT NOT NULL, kind TEXT NOT NULL, reference TEXT NOT NULL, event_id TEXT NOT NULL,
    tenant TEXT NOT NULL, message TEXT NOT NULL, published INTEGER NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (gateway, kind, reference));
"""


@dataclass(frozen=True, slots=True)
class WebhookResult:
    """How one webhook ended; ``problem`` set means an RFC 9457 answer with ``status``."""

    status: int
    outcome: str  # published | already_notified | ignored | refused | replayed | not_confirmed | unavailable |
    #                unknown_gateway | failed
    detail: str
    event_id: str | None = None
    problem: str | None = None  # problem type suffix, e.g. webhook-replayed

    def body(self) -> dict[str, str | None]:
        return {"status": self.outcome, "event_id": self.event_id, "detail": self.detail}


class PaymentWebhooks:
    def __init__(self, db: Database, bus: Bus, gateways: Mapping[str, Gateway]) -> None:
        self.db = db
        self.bus = bus
        self.gateways = dict(gateways)

    async def setup(self) -> None:
        await self.db.executescript(SCHEMA)  # type: ignore[attr-defined]

    async def close(self) -> None:
        for gateway in self.gateways.values():
            await gateway.close()

    async def handle(self, gateway_name: str, raw_body: bytes, headers: Mapping[str, str]) -> WebhookResult:
        try:
            result = await self._handle(gateway_name, raw_body, headers)
        except Exception:
            log.exception("payment_webhook_failed", gateway=gateway_name)
            result = WebhookResult(503, "failed", "The webhook could not be processed now; nothing was recorded. "
                                                  "Retry later.", problem="webhook-not-processed")
        WEBHOOKS.labels(gateway_name if gateway_name in self.gateways else "unknown", result.outcome).inc()
        log.info("payment_webhook", gateway=gateway_name, outcome=result.outcome, status=result.status,
                 event_id=result.event_id, detail=result.detail)
        return result

    async def _handle(self, gateway_name: str, raw_body: bytes, headers: Mapping[str, str]) -> WebhookResult:
        gateway = self.gateways.get(gateway_name)
        if gateway is None:
            return WebhookResult(404, "unknown_gateway", f"No payment gateway {gateway_name!r} is enabled here.",
                                 problem="unknown-gateway")
        now = utcnow()
        try:
            verified = await gateway.verify(raw_body, headers, now)
        except GatewayUnavailable as exc:
            return WebhookResult(502, "unavailable", str(exc), problem="gateway-unavailable")
        if isinstance(verified, Refused):
            return WebhookResult(400, "refused", verified.detail, problem=verified.kind.value)
        if await self._seen(verified):
            return self._replayed(verified)
        try:
            confirmation = await gateway.confirm(verified)
        except GatewayUnavailable as exc:
            return WebhookResult(502, "unavailable", str(exc), verified.event_id, problem="gateway-unavailable")
        if isinstance(confirmation, NotConfirmed):
            return WebhookResult(422, "not_confirmed", confirmation.detail, verified.event_id,
                                 problem=confirmation.kind.value)
        if isinstance(confirmation, Ignored):
            if not await self._record_ignored(verified, confirmation, now):
                return self._replayed(verified)
            return WebhookResult(200, "ignored", confirmation.detail, verified.event_id)
        if isinstance(confirmation, (ConfirmedCardUpdate, ConfirmedCustomerDeleted)):
            return await self._publish_command(verified, confirmation, now)
        return await self._publish(verified, confirmation, now)

    async def _seen(self, event: VerifiedEvent) -> bool:
        row = await self.db.fetchrow("SELECT outcome FROM webhook_events WHERE gateway = $1 AND replay_key = $2",
                                     event.gateway, event.replay_key)
        return row is not None

    @staticmethod
    def _replayed(event: VerifiedEvent) -> WebhookResult:
        return WebhookResult(409, "replayed", f"Event {event.event_id} was already processed; nothing was done.",
                             event.event_id, problem="webhook-replayed")

    async def _record_ignored(self, event: VerifiedEvent, ignored: Ignored, now: datetime) -> bool:
        async with self.db.transaction() as conn:
            rows = await conn.fetch(
                "INSERT INTO webhook_events (gateway, replay_key, event_id, event_type, outcome, reference, "
                "received_at) VALUES ($1, $2, $3, $4, 'ignored', NULL, $5) ON CONFLICT DO NOTHING "
                "RETURNING replay_key", event.gateway, event.replay_key, event.event_id, event.event_type,
                isoformat(now))
        return bool(rows)

    async def _publish_command(self, event: VerifiedEvent, update: ConfirmedCommand, now: datetime) -> WebhookResult:
        command = update.command(event, now)
        await self.bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(update.tenant)),
                                           command.to_json(), (("schema", b"ledger.command/v1"),))])
        async with self.db.transaction() as conn:
            recorded = await conn.fetch(
                "INSERT INTO webhook_events (gateway, replay_key, event_id, event_type, outcome, reference, "
                "received_at) VALUES ($1, $2, $3, $4, 'published', $5, $6) ON CONFLICT DO NOTHING "
                "RETURNING replay_key", event.gateway, event.replay_key, event.event_id, event.event_type,
                update.reference, isoformat(now))
        if not recorded:  # the same event, delivered twice at once, finished first in another request
            return self._replayed(event)
        return WebhookResult(200, "published", update.summary(), event.event_id)

    async def _publish(self, event: VerifiedEvent, payment: ConfirmedPayment, now: datetime) -> WebhookResult:
        key = (event.gateway, payment.kind, payment.reference)
        message = payment.notification(event, now).to_json().decode()
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO notified_payments (gateway, kind, reference, event_id, tenant, message, published, "
                "created_at) VALUES ($1, $2, $3, $4, $5, $6, 0, $7) ON CONFLICT DO NOTHING",
                *key, event.event_id, payment.tenant, message, isoformat(now))
            stored = await conn.fetchrow(
                "SELECT message, published, tenant, event_id FROM notified_payments WHERE gateway = $1 AND kind = $2 "
                "AND reference = $3", *key)
        assert stored is not None
        if not stored["published"]:
            # Ours, or one remembered by an earlier delivery that did not finish: the stored copy either way.
            await self.bus.publish([OutMessage(topics.PAYMENTS, str(ids.account_id(stored["tenant"])),
                                               stored["message"].encode(), (("schema", b"payment/v1"),))])
        # "published": this event's notification is out (now, or by an earlier unfinished delivery of it).
        outcome = "published" if stored["event_id"] == event.event_id else "already_notified"
        async with self.db.transaction() as conn:
            await conn.execute("UPDATE notified_payments SET published = 1 WHERE gateway = $1 AND kind = $2 "
                               "AND reference = $3", *key)
            recorded = await conn.fetch(
                "INSERT INTO webhook_events (gateway, replay_key, event_id, event_type, outcome, reference, "
                "received_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING RETURNING replay_key",
                event.gateway, event.replay_key, event.event_id, event.event_type, outcome, payment.reference,
                isoformat(now))
        if not recorded:  # the same event, delivered twice at once, finished first in another request
            return self._replayed(event)
        if outcome == "published":
            return WebhookResult(200, "published", f"{payment.kind} {payment.amount} {payment.currency} for "
                                                   f"{payment.tenant} (order {payment.order_id})", event.event_id)
        return WebhookResult(200, "already_notified", f"{payment.reference} was already notified by another "
                                                      f"event; no new notification.", event.event_id)
