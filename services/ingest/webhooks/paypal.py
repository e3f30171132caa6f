"""PayPal: the webhook is verified by PayPal's own ``POST /v1/notifications/verify-webhook-signature`` call
(the transmission headers, our webhook id and the event exactly as received), then the capture or refund
is re-fetched (``GET /v2/payments/captures/{id}``, ``GET /v2/payments/refunds/{id}``). OAuth 2.0 client
credentials; httpx with an injectable transport for tests.

Events acted on: ``PAYMENT.CAPTURE.COMPLETED`` (capture status ``COMPLETED``) and
``PAYMENT.CAPTURE.REFUNDED`` (refund status ``COMPLETED``). Tenant: the purchase unit's ``custom_id``;
order id: its ``invoice_id`` (PayPal carries both onto the capture and its refunds). The replay key is the
event id, which is part of the verified event.

``CHECKOUT.ORDER.APPROVED``: the customer approved an order created with ``intent: CAPTURE`` (hosted checkout),
which moves no money until someone captures it, so ingest captures it here (``POST
/v2/checkout/orders/{id}/capture``, ``PayPal-Request-Id: capture-<order>``: a retried webhook never captures
twice; an order captured already is re-fetched). A ``COMPLETED`` capture is published like
``PAYMENT.CAPTURE.COMPLETED`` (same reference: the capture id, so that event, when it follows, publishes
nothing more); a capture still ``PENDING`` is left to the ``PAYMENT.CAPTURE.COMPLETED`` that follows it.

Disputes: ``CUSTOMER.DISPUTE.CREATED`` (opened) and ``CUSTOMER.DISPUTE.RESOLVED`` (status ``RESOLVED``; its
``dispute_outcome.outcome_code`` gives the outcome: ``RESOLVED_BUYER_FAVOUR`` / ``ACCEPTED`` lost,
``RESOLVED_SELLER_FAVOUR`` / ``DENIED`` / ``RESOLVED_WITH_PAYOUT`` won, ``CANCELED_BY_BUYER`` / ``NONE`` closed). The
dispute is re-fetched (``GET /v1/customer/disputes/{dispute_id}``) and so is the capture it disputes (the first
``disputed_transactions[].seller_transaction_id``), whose ``custom_id`` / ``invoice_id`` attribute it. Amount: the
``dispute_amount``; a lost dispute's ``dispute_outcome.amount_refunded`` when PayPal gives it. PayPal announces no
separate withdrawal: the books follow the outcome. ``CUSTOMER.DISPUTE.UPDATED`` is ignored. Every movement carries the
dispute's fees so far (``dispute_fee``: the seller's fee money movements, ``DISPUTE_FEE_REASONS``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
from billing_events.messages import PaymentKind, loads_exact
from billing_events.money import MoneyError, currency, parse_decimal
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
)
from billing_runtime.settings import Settings

NAME = "paypal"
TRANSMISSION_HEADERS = {
    "auth_algo": "PAYPAL-AUTH-ALGO",
    "cert_url": "PAYPAL-CERT-URL",
    "transmission_id": "PAYPAL-TRANSMISSION-ID",
    "transmission_sig": "PAYPAL-TRANSMISSION-SIG",
    "transmission_time": "PAYPAL-TRANSMISSION-TIME",
}
TOKEN_REFRESH_MARGIN_SECONDS = 60
_RESOURCE_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
# The seller's money movements of a dispute that are fees PayPal charged (or, credited, gave back).
DISPUTE_FEE_REASONS = frozenset({"DISPUTE_FEE", "CHARGEBACK_FEE", "DISPUTE_SETTLEMENT_FEE"})
DISPUTE_OUTCOMES = {"RESOLVED_BUYER_FAVOUR": "lost", "ACCEPTED": "lost", "RESOLVED_SELLER_FAVOUR": "won",
                    "DENIED": "won", "RESOLVED_WITH_PAYOUT": "won", "CANCELED_BY_BUYER": "closed", "NONE": "closed"}
DISPUTE_EVENTS = {"CUSTOMER.DISPUTE.CREATED": "dispute_opened", "CUSTOMER.DISPUTE.RESOLVED": "dispute_closed"}


class PayPalGateway:
    name = NAME

    def __init__(self, http: httpx.AsyncClient, client_id: str, client_secret: str, webhook_id: str,
                 tolerance_seconds: int = 300) -> None:
        self._http = http
        self._tolerance_seconds = tolerance_seconds
        self._credentials = (client_id, client_secret)
        self._webhook_id = webhook_id
        self._token: str | None = None
        self._token_expires_at = 0.0  # monotonic seconds

    async def verify(self, raw_body: bytes, headers: Mapping[str, str], now: datetime) -> VerifiedEvent | Refused:
        transmission = {field: header(headers, name) for field, name in TRANSMISSION_HEADERS.items()}
        missing = [TRANSMISSION_HEADERS[f] for f, v in transmission.items() if not v]
        if missing:
            return Refused(RefusalKind.SIGNATURE_INVALID, f"Missing PayPal headers: {', '.join(missing)}.")
        transmitted_at = _transmission_time(transmission["transmission_time"] or "")
        if transmitted_at is None:
            return Refused(RefusalKind.SIGNATURE_INVALID,
                           "PAYPAL-TRANSMISSION-TIME is not an ISO 8601 date-time with a UTC offset.")
        try:
            text = raw_body.decode("utf-8")
            event = loads_exact(text)
        except (ValueError, UnicodeDecodeError) as exc:
            return Refused(RefusalKind.MALFORMED, f"Body is not JSON: {str(exc)[:120]}")
        resource = event.get("resource") if isinstance(event, dict) else None
        if not (isinstance(event.get("id"), str) and isinstance(event.get("event_type"), str)
                and isinstance(resource, dict)):
            return Refused(RefusalKind.MALFORMED, "A PayPal event needs id, event_type and resource.")
        # The event goes back exactly as received (spliced in, not re-serialised): PayPal's check covers
        # a CRC32 of the body, which re-encoding could change.
        fields = json.dumps({**transmission, "webhook_id": self._webhook_id})
        request_body = fields[:-1] + ', "webhook_event": ' + text + "}"
        response = await self._call("POST", "/v1/notifications/verify-webhook-signature", content=request_body,
                                    headers={"Content-Type": "application/json"})
        if response.status_code != 200:
            if 400 <= response.status_code < 500 and response.status_code not in (401, 403, 429):
                return Refused(RefusalKind.SIGNATURE_INVALID,
                               f"PayPal refused to verify this webhook (HTTP {response.status_code}).")
            raise GatewayUnavailable(f"PayPal verify-webhook-signature answered HTTP {response.status_code}")
        status = _json(response).get("verification_status")
        if status != "SUCCESS":
            return Refused(RefusalKind.SIGNATURE_INVALID, f"PayPal says the signature is {status}.")
        # PayPal's signature covers the transmission time; like Stripe's signed `t`, it must be within the window
        # (both directions) against our clock, or a captured webhook could be replayed for ever.
        age = now.timestamp() - transmitted_at.timestamp()
        if abs(age) > self._tolerance_seconds:
            return Refused(RefusalKind.EXPIRED, f"Transmitted {int(age)} s ago; the tolerance is "
                                                f"{self._tolerance_seconds} s.")
        return VerifiedEvent(NAME, event["id"], event["event_type"], event, replay_key=event["id"])

    async def confirm(self, event: VerifiedEvent) -> Confirmation:
        if event.event_type == "CHECKOUT.ORDER.APPROVED":
            return await self._capture_approved(event)
        if event.event_type in DISPUTE_EVENTS:
            return await self._confirm_dispute(DISPUTE_EVENTS[event.event_type], event)  # type: ignore[arg-type]
        kinds = {"PAYMENT.CAPTURE.COMPLETED": ("captures", "payment_succeeded"),
                 "PAYMENT.CAPTURE.REFUNDED": ("refunds", "refund_succeeded")}
        if event.event_type not in kinds:
            return Ignored(f"PayPal event {event.event_type} moves no money billing acts on.")
        collection, kind = kinds[event.event_type]
        resource_id = event.payload["resource"].get("id")
        if not isinstance(resource_id, str) or not _RESOURCE_ID.match(resource_id):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, "The event carries no valid resource.id.")
        obj = await self._read(f"/v2/payments/{collection}/{resource_id}", f"{collection} {resource_id}")
        if isinstance(obj, NotConfirmed):
            return obj
        if obj.get("status") != "COMPLETED":
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"PayPal says {collection} {resource_id} is {obj.get('status')}, not COMPLETED.")
        return _confirmed(kind, collection, resource_id, obj)

    async def _read(self, path: str, what: str) -> dict[str, Any] | NotConfirmed:
        """``GET path`` of PayPal's API: the object, or NotConfirmed when PayPal does not know ``what`` (400, 404);
        any other answer than 200 is the gateway unavailable (``GatewayUnavailable``)."""
        response = await self._call("GET", path)
        if response.status_code in (400, 404):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"PayPal does not know {what}.")
        if response.status_code != 200:
            raise GatewayUnavailable(f"PayPal API answered HTTP {response.status_code} for {what}")
        return _json(response)

    async def _capture_approved(self, event: VerifiedEvent) -> Confirmation:
        order_id = event.payload["resource"].get("id")
        if not isinstance(order_id, str) or not _RESOURCE_ID.match(order_id):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, "The event carries no valid resource.id.")
        response = await self._call("POST", f"/v2/checkout/orders/{order_id}/capture", content=b"{}",
                                    headers={"Content-Type": "application/json",
                                             "PayPal-Request-Id": f"capture-{order_id}"})
        if response.status_code == 422 and "ORDER_ALREADY_CAPTURED" in response.text:
            response = await self._call("GET", f"/v2/checkout/orders/{order_id}")
        if response.status_code in (400, 404, 422):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                f"PayPal did not capture order {order_id} (HTTP {response.status_code}: "
                                f"{response.text[:200]}).")
        if response.status_code not in (200, 201):
            raise GatewayUnavailable(f"PayPal API answered HTTP {response.status_code} capturing {order_id}")
        units = _json(response).get("purchase_units")
        unit = units[0] if isinstance(units, list) and units and isinstance(units[0], dict) else {}
        payments = unit.get("payments") if isinstance(unit.get("payments"), dict) else {}
        captures = payments.get("captures") if isinstance(payments.get("captures"), list) else []
        capture = captures[0] if captures and isinstance(captures[0], dict) else None
        if capture is None or not isinstance(capture.get("id"), str):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"PayPal order {order_id} has no capture.")
        if capture.get("status") != "COMPLETED":
            return Ignored(f"PayPal capture {capture['id']} of order {order_id} is {capture.get('status')}: its "
                           f"PAYMENT.CAPTURE.COMPLETED settles it.")
        # The capture carries the purchase unit's custom_id / invoice_id; fall back to the unit's own.
        attributed = {**{k: unit.get(k) for k in ("custom_id", "invoice_id")},
                      **{k: v for k, v in capture.items() if k in ("custom_id", "invoice_id") and v}}
        return _confirmed("payment_succeeded", "captures", capture["id"], {**capture, **attributed})

    async def _confirm_dispute(self, kind: PaymentKind, event: VerifiedEvent) -> Confirmation:
        dispute_id = event.payload["resource"].get("dispute_id")
        if not isinstance(dispute_id, str) or not _RESOURCE_ID.match(dispute_id):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, "The event carries no valid resource.dispute_id.")
        dispute = await self._read(f"/v1/customer/disputes/{dispute_id}", f"dispute {dispute_id}")
        if isinstance(dispute, NotConfirmed):
            return dispute
        outcome = None
        if kind == "dispute_closed":
            found = dispute.get("dispute_outcome")
            code = found.get("outcome_code") if isinstance(found, dict) else None
            outcome = DISPUTE_OUTCOMES.get(str(code))
            if dispute.get("status") != "RESOLVED" or outcome is None:
                return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED,
                                    f"PayPal says dispute {dispute_id} is {dispute.get('status')} ({code}), not "
                                    "resolved.")
        transactions = dispute.get("disputed_transactions")
        first = transactions[0] if isinstance(transactions, list) and transactions else None
        capture_id = first.get("seller_transaction_id") if isinstance(first, dict) else None
        if not isinstance(capture_id, str) or not _RESOURCE_ID.match(capture_id):
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"Dispute {dispute_id} names no capture.")
        capture = await self._read(f"/v2/payments/captures/{capture_id}", f"capture {capture_id}")
        if isinstance(capture, NotConfirmed):
            return capture
        who = attribution(capture, tenant_key="custom_id", order_key="invoice_id")
        if who is None:
            return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                                f"Dispute {dispute_id}: capture {capture_id} has no custom_id (tenant) / invoice_id "
                                "(order id).")
        refunded = dispute["dispute_outcome"].get("amount_refunded") if outcome == "lost" else None
        money = refunded if isinstance(refunded, dict) and refunded.get("value") else dispute.get("dispute_amount")
        try:
            money = money if isinstance(money, dict) else {}
            unit = currency(str(money.get("currency_code")))
            amount = parse_decimal(money.get("value"), field="amount")
            fee = dispute_fee(dispute)
        except MoneyError as exc:
            return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"PayPal's dispute amount is not usable: {exc}")
        return dispute_movement(kind, who, amount, unit.code, dispute_id, capture_id,
                                outcome=outcome, fee=fee)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._http.aclose()


    async def _call(self, method: str, path: str, *, headers: dict[str, str] | None = None,
                    **kwargs: Any) -> httpx.Response:
        """One API call with a bearer token; a 401 (expired token) refreshes the token once."""
        response: httpx.Response | None = None
        for attempt in range(2):
            token = await self._access_token(force=attempt > 0)
            try:
                response = await self._http.request(
                    method, path, headers={**(headers or {}), "Authorization": f"Bearer {token}"}, **kwargs)
            except httpx.HTTPError as exc:
                raise GatewayUnavailable(f"PayPal API: {type(exc).__name__}: {exc}") from exc
            if response.status_code != 401:
                break
        assert response is not None
        return response

    async def _access_token(self, force: bool = False) -> str:
        if self._token is not None and not force and time.monotonic() < self._token_expires_at:
            return self._token
        try:
            response = await self._http.post("/v1/oauth2/token", auth=self._credentials,
                                             data={"grant_type": "client_credentials"})
        except httpx.HTTPError as exc:
            raise GatewayUnavailable(f"PayPal OAuth: {type(exc).__name__}: {exc}") from exc
        body = _json(response) if response.status_code == 200 else {}
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int):
            raise GatewayUnavailable(f"PayPal OAuth answered HTTP {response.status_code} without a token")
        self._token = token
        self._token_expires_at = time.monotonic() + max(0, expires_in - TOKEN_REFRESH_MARGIN_SECONDS)
        return token


def _confirmed(kind: str, collection: str, resource_id: str, obj: dict[str, Any]) -> Confirmation:
    """A completed capture or refund as a payment: tenant and order id from ``custom_id`` / ``invoice_id``."""
    who = attribution(obj, tenant_key="custom_id", order_key="invoice_id")
    if who is None:
        return NotConfirmed(NotConfirmedKind.UNATTRIBUTABLE,
                            f"{collection} {resource_id} has no custom_id (tenant) / invoice_id (order id).")
    money = obj.get("amount") if isinstance(obj.get("amount"), dict) else {}
    try:
        unit = currency(str(money.get("currency_code")))
        amount = parse_decimal(money.get("value"), field="amount")  # a decimal string, never a float
    except MoneyError as exc:
        return NotConfirmed(NotConfirmedKind.NOT_CONFIRMED, f"PayPal's amount is not usable: {exc}")
    refunded = _refunded_capture(obj) if collection == "refunds" else None
    return ConfirmedPayment(kind, who[0], who[1], amount, unit.code, resource_id,  # type: ignore[arg-type]
                            refunded_payment=refunded)


def dispute_fee(dispute: dict[str, Any]) -> tuple[Decimal, str] | None:
    """The fees PayPal has charged the seller for a dispute so far, net of what it gave back: its ``money_movements``
    of the seller (``affected_party``, or ``party``) for a fee (``reason`` in ``DISPUTE_FEE_REASONS``), a ``DEBIT``
    adding and a ``CREDIT`` taking off, in their currency. None: no fee movement (yet). ``MoneyError`` when PayPal's
    answer is not usable (several currencies, an unknown direction, a negative net)."""
    movements = [m for m in dispute.get("money_movements") or () if isinstance(m, dict)
                 and m.get("reason") in DISPUTE_FEE_REASONS and (m.get("affected_party") or m.get("party")) == "SELLER"]
    if not movements:
        return None
    total, codes = Decimal(0), set()
    for movement in movements:
        money = movement.get("amount") if isinstance(movement.get("amount"), dict) else {}
        codes.add(currency(str(money.get("currency_code"))).code)
        value = parse_decimal(money.get("value"), field="dispute fee")
        if movement.get("type") not in ("DEBIT", "CREDIT"):
            raise MoneyError(f"a dispute fee movement of type {movement.get('type')!r}, neither DEBIT nor CREDIT")
        total += value if movement["type"] == "DEBIT" else -value
    if len(codes) != 1 or total < 0:
        raise MoneyError(f"dispute fees of {total} in {sorted(codes)}")
    return total, codes.pop()


def _refunded_capture(refund: dict[str, Any]) -> str | None:
    """The capture a refund gave back: its ``up`` link (``.../v2/payments/captures/{id}``), or None."""
    links = refund.get("links") if isinstance(refund.get("links"), list) else []
    for link in links:
        href = link.get("href") if isinstance(link, dict) and link.get("rel") == "up" else None
        if isinstance(href, str) and "/captures/" in href:
            capture = href.rstrip("/").rsplit("/", 1)[-1]
            return capture if _RESOURCE_ID.match(capture) else None
    return None


def _transmission_time(value: str) -> datetime | None:
    """PAYPAL-TRANSMISSION-TIME (e.g. ``2026-11-21T10:00:00Z``) as an aware datetime; None when unreadable."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = loads_exact(response.content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayUnavailable(f"PayPal answered non-JSON (HTTP {response.status_code})") from exc
    if not isinstance(body, dict):
        raise GatewayUnavailable("PayPal answered a non-object")
    return body


def build(settings: Settings, transport: httpx.AsyncBaseTransport | None = None) -> PayPalGateway | None:
    """The PayPal gateway when its client id, secret and webhook id are set, else None."""
    values = (settings.paypal_client_id, settings.paypal_client_secret, settings.paypal_webhook_id)
    if not any(values):
        return None
    if not all(values):
        raise ValueError("PayPal webhooks need BILLING_PAYPAL_CLIENT_ID, BILLING_PAYPAL_CLIENT_SECRET and "
                         "BILLING_PAYPAL_WEBHOOK_ID")
    http = httpx.AsyncClient(base_url=settings.paypal_api_base, transport=transport,
                             timeout=settings.gateway_api_timeout_seconds)
    return PayPalGateway(http, settings.paypal_client_id or "", settings.paypal_client_secret or "",
                         settings.paypal_webhook_id or "", settings.paypal_webhook_tolerance_seconds)
