"""Razorpay: ``X-Razorpay-Signature`` (hex HMAC-SHA256 of the raw body with the webhook secret), then the
payment or refund re-fetched from Razorpay's API (``GET /v1/payments/{id}``, ``GET /v1/refunds/{id}``, basic
auth with the key id and secret) over httpx; the transport is injectable for tests.

Razorpay signs the body only: the window is checked on the body's own ``created_at`` (signed), and the
replay key is the SHA-256 of the signed body, so re-sending a captured body under another
``X-Razorpay-Event-Id`` header is still a replay.

Events acted on: ``payment.captured`` (payment status ``captured``, or ``refunded`` when it was captured and
refunded since) and ``refund.processed`` (refund status ``processed``). ``order.paid`` announces the same
money as ``payment.captured`` and is ignored. Tenant and order id: ``notes.tenant`` / ``notes.order_id`` of
the payment (a refund's own notes first).

Disputes (``GET /v1/disputes/{id}``, then its payment for the tenant and order id): ``payment.dispute.created``
(any status: opened), ``payment.dispute.won`` / ``lost`` / ``closed`` (the dispute's status must say so; closed:
ended without a chargeback, e.g. the transaction details sufficed). Razorpay deducts the money only when a
dispute is lost (``amount_deducted``, the amount of a lost dispute's notification; the disputed ``amount``
otherwise), so there is no withdrawal to announce before. ``under_review`` / ``action_required`` are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
from billing_events.messages import PaymentKind, loads_exact
from billing_events.money import MoneyError
from billing_ingest.webhooks import (
    Confirmation,
    ConfirmedPayment,
    GatewayUnavailable,
    Ignored,
    NotConfirmed,
    NotConfirmedKind,
    RefusalKind,
    Refused,
    VerifiedEvent,
    attribution,
    dispute_movement,
    header,
    minor_units_to_amount,
)
from billing_runtime.settings import Settings

NAME = "razorpay"
CLOCK_SKEW_SECONDS_MAX = 300  # how far in the future a signed created_at may be
_ENTITY_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
CAPTURED_PAYMENT_STATUSES = frozenset({"captured", "refunded"})
# A dispute event -> (the kind published, the dispute status Razorpay's API must show; None: any).
DISPUTE_EVENTS: dict[str, tuple[PaymentKind, str | None]] = {
    "payment.dispute.created": ("dispute_opened", None), "payment.dispute.won": ("dispute_closed", "won"),
    "payment.dispute.lost": ("dispute_closed", "lost"), "payment.dispute.closed": ("dispute_closed", "closed")}


class RazorpayGateway:
    name = NAME

    def __init__(self, http: httpx.AsyncClient, webhook_secret: str, tolerance_seconds: int) -> None:
        self._http = http
        self._secret = webhook_secret.encode()
        self._tolerance_seconds = tolerance_seconds

    async def verify(self, raw_body: bytes, headers: Mapping[str, str], now: datetime) -> VerifiedEvent | Refused:
        signature = header(headers, "X-Razorpay-Signature") or ""
        expected = hmac.new(self._secret, raw_body, hashlib.sha256).hexdigest()
        if not signature or not hmac.compare_digest(expected, signature.strip().lower()):
            return Refused(RefusalKind.SIGNATURE_INVALID, "X-Razorpay-Signature does not match the body.")
        try:
            event = loads_exact(raw_body)
        except (ValueError, UnicodeDecodeError) as exc:
            return Refused(RefusalKind.MALFORMED, f"Signed body is not JSON: {str(exc)[:120]}")
        if not (isinstance(event, dict) and isinstance(event.get("event"), str)
                and isinstance(event.get("payload"), dict) and isinstance(event.get("created_at"), int)):
            return Refused(RefusalKind.MALFORMED, "A Razorpay event needs event, payload and created_at.")
        age = now.timestamp() - event["created_at"]
        if age > self._tolerance_seconds or -age > CLOCK_SKEW_SECONDS_MAX:
            return Refused(RefusalKind.EXPIRED, f"Event created {int(age)} s ago; the tolerance is "
                                                f"{self._tolerance_seconds} s.")
        digest = "sha256:" + hashlib.sha256(raw_body).hexdigest()
        event_id = header(headers, "X-Razorpay-Event-Id") or digest
        return VerifiedEvent(NAME, event_id[:255], event["event"], event, replay_key=digest)

    async def confirm(self, event: VerifiedEvent) -> Confirmation:
        try:
            if event.event_type == "payment.captured":
                return await self._confirm_payment(_entity_id(event.payload, "payment"))
            if event.event_type == "refund.processed":
                return await self._confirm_refund(_entity_id(event.payload, "refund"))
            if event.event_type in DISPUTE_EVENTS:
                return await self._confirm_dispute(*DISPUTE_EVENTS[event.event_type],
                                                   _entity_id(event.payload, "dispute"))
        except _NotFound as exc:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, str(exc))
        except MoneyError as exc:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Razorpay's amount is not usable: {exc}")
        return Ignored(f"Razorpay event {event.event_type} moves no money billing acts on.")

    async def close(self) -> None:
        await self._http.aclose()

    async def _confirm_payment(self, payment_id: str) -> Confirmation:
        payment = await self._get(f"/v1/payments/{payment_id}")
        if payment.get("status") not in CAPTURED_PAYMENT_STATUSES:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Razorpay says payment {payment_id} is {payment.get('status')}, not captured.")
        who = await self._payment_attribution(payment)
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Payment {payment_id}: no notes.tenant / notes.order_id on it or its order.")
        amount, code = minor_units_to_amount(payment.get("amount"), payment.get("currency"))
        return ConfirmedPayment("payment_succeeded", who[0], who[1], amount, code, payment_id)

    async def _payment_attribution(self, payment: Mapping[str, Any]) -> tuple[str, str] | None:
        who = attribution(payment.get("notes"))
        order_id = payment.get("order_id")
        if who is None and isinstance(order_id, str) and _ENTITY_ID.match(order_id):
            # A Checkout payment of a Razorpay order carries the notes given to Checkout, not the order's: the
            # tenant and our order id are on the order (gateways/razorpay.py writes them there).
            who = attribution((await self._get(f"/v1/orders/{order_id}")).get("notes"))
        return who

    async def _confirm_dispute(self, kind: PaymentKind, status: str | None, dispute_id: str) -> Confirmation:
        dispute = await self._get(f"/v1/disputes/{dispute_id}")
        if status is not None and dispute.get("status") != status:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Razorpay says dispute {dispute_id} is {dispute.get('status')}, not {status}.")
        payment_id = dispute.get("payment_id")
        if not isinstance(payment_id, str) or not _ENTITY_ID.match(payment_id):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Dispute {dispute_id} names no payment.")
        who = await self._payment_attribution(await self._get(f"/v1/payments/{payment_id}"))
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Dispute {dispute_id}: no notes.tenant / notes.order_id on payment {payment_id} or "
                                "its order.")
        deducted = dispute.get("amount_deducted")
        lost = status == "lost" and isinstance(deducted, int) and not isinstance(deducted, bool) and deducted > 0
        amount, code = minor_units_to_amount(deducted if lost else dispute.get("amount"), dispute.get("currency"))
        return dispute_movement(kind, who, amount, code, dispute_id, payment_id,
                                outcome=status if kind == "dispute_closed" else None)  # type: ignore[arg-type]

    async def _confirm_refund(self, refund_id: str) -> Confirmation:
        refund = await self._get(f"/v1/refunds/{refund_id}")
        if refund.get("status") != "processed":
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"Razorpay says refund {refund_id} is {refund.get('status')}, not processed.")
        who = attribution(refund.get("notes"))
        payment_id = refund.get("payment_id")
        if who is None and isinstance(payment_id, str) and _ENTITY_ID.match(payment_id):
            who = attribution((await self._get(f"/v1/payments/{payment_id}")).get("notes"))
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Refund {refund_id}: no notes.tenant / notes.order_id on it or its payment.")
        amount, code = minor_units_to_amount(refund.get("amount"), refund.get("currency"))
        refunded = payment_id if isinstance(payment_id, str) and _ENTITY_ID.match(payment_id) else None
        return ConfirmedPayment("refund_succeeded", who[0], who[1], amount, code, refund_id,
                                refunded_payment=refunded)

    async def _get(self, path: str) -> dict[str, Any]:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"Razorpay API: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (400, 404):
            raise _NotFound(f"Razorpay does not confirm {path}: HTTP {response.status_code}")
        if response.status_code != 200:
            raise GatewayUnavailable(f"Razorpay API answered HTTP {response.status_code} for {path}")
        try:
            body = loads_exact(response.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise GatewayUnavailable(f"Razorpay API answered non-JSON for {path}") from exc
        if not isinstance(body, dict):
            raise GatewayUnavailable(f"Razorpay API answered a non-object for {path}")
        return body


class _NotFound(Exception):
    pass


def _entity_id(payload: Mapping[str, Any], kind: str) -> str:
    inner = payload.get("payload")
    section = inner.get(kind) if isinstance(inner, dict) else None
    entity = section.get("entity") if isinstance(section, dict) else None
    value = entity.get("id") if isinstance(entity, dict) else None
    if not isinstance(value, str) or not _ENTITY_ID.match(value):
        raise _NotFound(f"The event carries no valid payload.{kind}.entity.id.")
    return value


def build(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> RazorpayGateway | None:
    """The Razorpay gateway when its key id, key secret and webhook secret are set, else None."""
    values = (settings.razorpay_key_id, settings.razorpay_key_secret, settings.razorpay_webhook_secret)
    if not any(values):
        return None
    if not all(values):
        raise ValueError("Razorpay webhooks need BILLING_RAZORPAY_KEY_ID, BILLING_RAZORPAY_KEY_SECRET (to "
                         "re-fetch every payment) and BILLING_RAZORPAY_WEBHOOK_SECRET")
    http = httpx.AsyncClient(base_url=settings.razorpay_api_base, transport=transport,
                             auth=(settings.razorpay_key_id or "", settings.razorpay_key_secret or ""),
                             timeout=settings.gateway_api_timeout_seconds)
    return RazorpayGateway(http, settings.razorpay_webhook_secret or "", settings.razorpay_webhook_tolerance_seconds)
