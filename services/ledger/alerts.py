"""Low-balance alerts: on ``LowBalanceReached``, an email and a signed webhook to the account's endpoint.

Configured per account (``PUT /v1/accounts/{t}/alerts``: email, webhook_url, webhook_secret). The webhook body
is JSON; ``Billing-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` lets the receiver
check it and refuse old timestamps (replays). The balance and threshold are written as the ledger shows amounts
(``amounts.show``): the currency's ISO 4217 minor digits (``219.00`` EUR, ``5.005`` KWD), a credit type's catalogue
scale, more digits only when sub-minor value exists. Delivery is retried with exponential backoff, a bounded number
of times; the position (``alerts:low-balance``) is recorded after each alert, so a restart does not resend
what was delivered.
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
from billing_ledger.domain.catalog import Catalog
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.mail import send_text
from billing_ledger.notifier import SmtpSettings
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.utils import get_topic

log = get_logger(__name__)
ALERTS_NAME = "alerts:low-balance"
REACHED_TOPIC = get_topic(BillingAccount.LowBalanceReached)
SIGNATURE_HEADER = "Billing-Signature"
BACKOFF_BASE_SECONDS = 1.0
SCAN_BATCH_EVENTS_MAX = 100


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def post_signed(url: str, secret: str, payload: dict[str, Any], *, attempts_max: int,
                      transport: httpx.AsyncBaseTransport | None = None,
                      backoff_base_seconds: float = BACKOFF_BASE_SECONDS) -> bool:
    body = json.dumps(payload, sort_keys=True).encode()
    async with httpx.AsyncClient(timeout=10, transport=transport) as client:
        for attempt in range(attempts_max):
            timestamp = int(time.time())
            try:
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


async def process_pending(app: LedgerApplication, smtp: SmtpSettings | None, *, attempts_max: int = 5,
                          transport: httpx.AsyncBaseTransport | None = None,
                          backoff_base_seconds: float = BACKOFF_BASE_SECONDS) -> list[dict[str, Any]]:
    notifications = await asyncio.to_thread(app.unprocessed, ALERTS_NAME, SCAN_BATCH_EVENTS_MAX, [REACHED_TOPIC])
    sent: list[dict[str, Any]] = []
    if not notifications:
        return sent
    scales = credit_scales(await asyncio.to_thread(
        app.read, Catalog.create_id(), lambda c: dict(c.document.get("credit_units") or {})))
    for notification in notifications:
        event: Any = app.mapper.to_domain_event(notification)
        tenant = await asyncio.to_thread(app.read, event.originator_id, lambda a: a.tenant)
        config = await asyncio.to_thread(app.read, payment_profile_id(tenant or ""), lambda p: dict(p.alerts)) or {}
        alert = {"type": "low_balance", "tenant": tenant, "unit": event.unit, "at": event.at.isoformat(),
                 "available": show(event.available, event.unit, scales),
                 "threshold": show(event.threshold, event.unit, scales)}
        result = {**alert, "email": False, "webhook": None}
        if config.get("enabled", True) and tenant:
            if config.get("email"):
                result["email"] = await asyncio.to_thread(
                    send_text, smtp, config["email"], f"Low balance: {alert['available']} {event.unit}",
                    f"The balance of {tenant} is {alert['available']} {event.unit}, below {alert['threshold']}.\n")
            if config.get("webhook_url") and config.get("webhook_secret"):
                result["webhook"] = await post_signed(config["webhook_url"], config["webhook_secret"], alert,
                                                      attempts_max=attempts_max, transport=transport,
                                                      backoff_base_seconds=backoff_base_seconds)
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
