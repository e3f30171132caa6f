"""Emails every finalized invoice with its PDF attached, once (SMTP, configurable; off when no host is set).

It follows the event store's notification log for ``Invoice.Finalized`` events and records its position as
a Tracking row (``notifier:email``) after each message is handed to the SMTP server: at-least-once, and a
restart resumes after the last invoice sent.
"""

from __future__ import annotations

import asyncio
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from billing_ledger.application import LedgerApplication
from billing_ledger.domain.invoice import Invoice
from billing_ledger.invoice_pdf import render_pdf
from billing_runtime.logging import get_logger
from billing_runtime.service import pause
from eventsourcing.utils import get_topic

log = get_logger(__name__)

NOTIFIER_NAME = "notifier:email"
SCAN_BATCH_EVENTS_MAX = 500
SMTP_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    issuer: str
    # Where a tenant's invoices go: {tenant}@ this domain unless the account names an address.
    recipient_domain: str = "example.invalid"


def _send(settings: SmtpSettings, recipient: str, subject: str, body: str, pdf: bytes, filename: str) -> None:
    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content(body)
    message.add_attachment(pdf, maintype="application", subtype="pdf", filename=filename)
    with smtplib.SMTP(settings.host, settings.port, timeout=SMTP_TIMEOUT_SECONDS) as smtp:
        smtp.send_message(message)


FINALIZED_TOPIC = get_topic(Invoice.Finalized)


def send_pending(app: LedgerApplication, settings: SmtpSettings) -> int:
    sent = 0
    notifications = app.unprocessed(NOTIFIER_NAME, SCAN_BATCH_EVENTS_MAX, [FINALIZED_TOPIC])
    for notification in notifications:
        if notification.topic == FINALIZED_TOPIC:
            event: Any = app.mapper.to_domain_event(notification)
            rendered = app.read(notification.originator_id, lambda invoice, event=event: (
                invoice.tenant, invoice.currency, invoice.document_type,
                (invoice.seller or {}).get("name") or settings.issuer, render_pdf(invoice, issuer=settings.issuer)))
            if rendered is not None:
                tenant, currency, document_type, seller, pdf = rendered
                kind = "Credit note" if document_type == "credit_note" else "Invoice"
                _send(settings, f"{tenant}@{settings.recipient_domain}",
                      f"{kind} {event.number} from {seller}",
                      f"{kind} {event.number}: {event.total} {currency}, due {event.due_at.date()}.\n",
                      pdf, f"{event.number}.pdf")
                sent += 1
    if notifications:
        # After the whole batch went out: a failure re-sends the batch (at least once), never skips one.
        app.processed(NOTIFIER_NAME, notifications[-1].id)
    return sent


async def run_notifier(app: LedgerApplication, settings: SmtpSettings, stopping: asyncio.Event,
                       interval_seconds: float = 1.0) -> None:
    while not stopping.is_set():
        try:
            await asyncio.to_thread(send_pending, app, settings)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning("invoice_email_failed_will_retry", error=str(exc))
        await pause(stopping, interval_seconds)
