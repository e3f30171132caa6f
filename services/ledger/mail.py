"""Plain notification emails (payment failures, low balance, digests) through the configured SMTP server."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

from billing_ledger.notifier import SMTP_TIMEOUT_SECONDS, SmtpSettings
from billing_runtime.logging import get_logger

log = get_logger(__name__)


def send_text(settings: SmtpSettings | None, recipient: str, subject: str, body: str) -> bool:
    """Sends one email; without SMTP settings it is only logged (returns False)."""
    if settings is None:
        log.info("notification_not_emailed", recipient=recipient, subject=subject)
        return False
    message = EmailMessage()
    message["From"] = settings.sender
    message["To"] = recipient
    message["Subject"] = subject
    message.set_content(body)
    with smtplib.SMTP(settings.host, settings.port, timeout=SMTP_TIMEOUT_SECONDS) as smtp:
        smtp.send_message(message)
    return True


def tenant_address(settings: SmtpSettings | None, tenant: str) -> str:
    return f"{tenant}@{settings.recipient_domain if settings else 'example.invalid'}"
