"""Account alerts: an email and a signed webhook to the account's endpoint on ``LowBalanceReached``, and on a saved
card's expiry notices (``Roster.PaymentMethodExpiring``, ``Roster.PaymentMethodExpired``, recorded once per card
expiry by ``card_expiry_notices``).

Configured per account (``PUT /v1/accounts/{t}/alerts``: email, webhook_url, webhook_secret, enabled). The webhook
body is JSON; ``Billing-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` lets the receiver
check it and refuse old timestamps (replays). The balance and threshold are written as the ledger shows amounts
(``amounts.show``): the currency's ISO 4217 minor digits (``219.00`` EUR, ``5.005`` KWD), a credit type's catalogue
scale, more digits only when sub-minor value exists. Delivery is retried with exponential backoff, a bounded number
of times; the position (``alerts:low-balance``, the name it had before the card notices joined: a new name would
resend every alert) is recorded after each alert, so a restart does not resend what was delivered. A low-balance
email goes to the configured address only; a card notice, like a failed payment's email (dunning), goes to the
configured address, else to the tenant's (``<tenant>@BILLING_SMTP_RECIPIENT_DOMAIN``). The webhook URL must reach
a public address (``outbound_urls``: checked when set and, resolved, before each attempt, which connects to the very
address checked, never through a proxy named by the environment; a refused target is logged
``alert_webhook_target_refused`` and not posted to) unless ``BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from billing_ledger.amounts import credit_scales, show
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.card_expiry import expiry_label
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.domain.roster import Roster
from billing_ledger.mail import send_text, tenant_address
from billing_ledger.notifier import SmtpSettings
from billing_ledger.outbound_urls import OutboundUrlRefused, PinnedTransport, public_address
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from billing_runtime.settings import Settings
from eventsourcing.utils import get_topic

log = get_logger(__name__)
ALERTS_NAME = "alerts:low-balance"
REACHED_TOPIC = get_topic(BillingAccount.LowBalanceReached)
EXPIRING_TOPIC = get_topic(Roster.PaymentMethodExpiring)
EXPIRED_TOPIC = get_topic(Roster.PaymentMethodExpired)
ALERT_TOPICS = [REACHED_TOPIC, EXPIRING_TOPIC, EXPIRED_TOPIC]
SIGNATURE_HEADER = "Billing-Signature"
BACKOFF_BASE_SECONDS = 1.0
WEBHOOK_SECONDS_MAX = 10.0  # one attempt's timeout (connect, send, each read)
SCAN_BATCH_EVENTS_MAX = 100


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def post_signed(url: str, secret: str, payload: dict[str, Any], *, attempts_max: int,
                      transport: httpx.AsyncBaseTransport | None = None,
                      backoff_base_seconds: float = BACKOFF_BASE_SECONDS, private_allowed: bool = False) -> bool:
    """``transport``: the network in tests (the resolved address is still checked; it is not connected to)."""
    body = json.dumps(payload, sort_keys=True).encode()
    for attempt in range(attempts_max):
        through = transport
        if not private_allowed:
            try:  # what the name resolves to now (DNS rebinding): never a private, loopback or link-local address
                address = await public_address(url)
            except OutboundUrlRefused as exc:
                log.warning("alert_webhook_target_refused", url=url, reason=str(exc))
                return False
            # ... and the connection goes to that very address: the client does not resolve the name again.
            through = transport or PinnedTransport(url, address)
        timestamp = int(time.time())
        try:
            # No proxy from the environment (``HTTPS_PROXY``, ``ALL_PROXY``, ...) when the address is pinned: a proxy
            # resolves the name itself and connects wherever it points, past the check (``outbound_urls``).
            async with httpx.AsyncClient(timeout=WEBHOOK_SECONDS_MAX, transport=through,
                                         trust_env=private_allowed) as client:
                response = await client.post(url, content=body, headers={
                    "Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, timestamp, body)})
            if response.status_code < 300:
                return True
            log.warning("alert_webhook_refused", url=url, status=response.status_code, attempt=attempt + 1)
        except httpx.HTTPError as exc:
            log.warning("alert_webhook_unreachable", url=url, error=str(exc), attempt=attempt + 1)
        if attempt + 1 < attempts_max:
            await asyncio.sleep(backoff_base_seconds * 2**attempt)
    return False


def _card_alert(event: Any, tenant: str, method: dict[str, Any] | None) -> tuple[dict[str, Any], str, str]:
    """The webhook body, email subject and email text of a card's expiry notice."""
    card, expired = event.card, type(event).__name__ == "PaymentMethodExpired"
    name = (method or {}).get("label") or f"{card['brand'].title()} {card['last4']}"
    alert = {"type": "payment_method_expired" if expired else "payment_method_expiring", "tenant": tenant,
             "method_id": event.method_id, "label": name, "brand": card["brand"], "last4": card["last4"],
             "exp_month": card["exp_month"], "exp_year": card["exp_year"],
             "expires_at": event.expires_at.isoformat(), "at": event.at.isoformat()}
    default = bool(method and method.get("default"))
    role = "default payment method" if default else "backup payment method"
    if expired:
        subject = f"Card expired: {name} ({expiry_label(card)})"
        body = (f"The card {name} of {tenant}, your {role}, expired at the end of {expiry_label(card)}. Charges now "
                "go to your other saved payment methods first; add a new card or update this one.\n")
    else:
        subject = f"Card expiring: {name} ({expiry_label(card)})"
        body = (f"The card {name} of {tenant}, your {role}, expires at the end of {expiry_label(card)}. Add a new "
                "card or update this one so that your payments go on.\n")
    return alert, subject, body


def _method(roster: Any, method_id: str) -> dict[str, Any] | None:
    for index, method in enumerate(roster.payment_methods):
        if method["method_id"] == method_id:
            return {**method, "default": index == 0}
    return None


async def process_pending(app: LedgerApplication, smtp: SmtpSettings | None, *, attempts_max: int = 5,
                          transport: httpx.AsyncBaseTransport | None = None,
                          backoff_base_seconds: float = BACKOFF_BASE_SECONDS,
                          private_allowed: bool | None = None) -> list[dict[str, Any]]:
    if private_allowed is None:
        private_allowed = Settings.from_env().outbound_private_targets_allowed
    notifications = await asyncio.to_thread(app.unprocessed, ALERTS_NAME, SCAN_BATCH_EVENTS_MAX, ALERT_TOPICS)
    sent: list[dict[str, Any]] = []
    if not notifications:
        return sent
    scales = credit_scales(await asyncio.to_thread(
        app.read, Catalog.create_id(), lambda c: dict(c.document.get("credit_units") or {})))
    for notification in notifications:
        event: Any = app.mapper.to_domain_event(notification)
        if notification.topic == REACHED_TOPIC:
            tenant = await asyncio.to_thread(app.read, event.originator_id, lambda a: a.tenant)
            alert = {"type": "low_balance", "tenant": tenant, "unit": event.unit, "at": event.at.isoformat(),
                     "available": show(event.available, event.unit, scales),
                     "threshold": show(event.threshold, event.unit, scales)}
            subject = f"Low balance: {alert['available']} {event.unit}"
            body = f"The balance of {tenant} is {alert['available']} {event.unit}, below {alert['threshold']}.\n"
            fallback = None  # low-balance emails go to the configured address only
        else:
            found = await asyncio.to_thread(app.read, event.originator_id,
                                            lambda r, m=event.method_id: (r.tenant, _method(r, m)))
            tenant, method = found if found is not None else (None, None)
            alert, subject, body = _card_alert(event, tenant or "", method)
            fallback = tenant_address(smtp, tenant) if tenant else None
        config = await asyncio.to_thread(app.read, payment_profile_id(tenant or ""), lambda p: dict(p.alerts)) or {}
        result = {**alert, "email": False, "webhook": None}
        if config.get("enabled", True) and tenant:
            recipient = config.get("email") or fallback
            if recipient:
                result["email"] = await asyncio.to_thread(send_text, smtp, recipient, subject, body)
            if config.get("webhook_url") and config.get("webhook_secret"):
                result["webhook"] = await post_signed(config["webhook_url"], config["webhook_secret"], alert,
                                                      attempts_max=attempts_max, transport=transport,
                                                      backoff_base_seconds=backoff_base_seconds,
                                                      private_allowed=private_allowed)
        sent.append(result)
        await asyncio.to_thread(app.processed, ALERTS_NAME, notification.id)
    return sent


async def run_alerts(app: LedgerApplication, smtp: SmtpSettings | None, attempts_max: int, stopping: asyncio.Event,
                     interval_seconds: float = 5.0,
                     is_leader: Callable[[], Awaitable[bool]] | None = None) -> None:
    while not stopping.is_set():
        try:
            if is_leader is None or await is_leader():  # one process at a time
                await process_pending(app, smtp, attempts_max=attempts_max)
        except OSError as exc:
            log.warning("alerts_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)
