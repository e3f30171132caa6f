"""Low-balance alerts: an email and a signed webhook, retried with backoff (bounded), sent once."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from billing_ledger.alerts import SIGNATURE_HEADER, process_pending
from billing_ledger.application import LedgerApplication
from billing_ledger.notifier import SmtpSettings

from tests.support import Inbox
from tests.unit.payments.support import ledger, run

__all__ = ["ledger"]


@pytest.mark.asyncio
async def test_low_balance_email_and_signed_webhook_with_retries(ledger: LedgerApplication,
                                                                 smtp: tuple[Inbox, int]) -> None:
    now = datetime.now(UTC)
    assert run(ledger, "account.open", "beta", currency="USD", low_balance_threshold="10").outcome == "applied"
    assert run(ledger, "credit.grant", "beta", "g", unit="USD", amount="20", grant_key="g", source="manual",
               effective_at=(now - timedelta(hours=1)).isoformat()).outcome == "applied"
    configured = run(ledger, "alerts.configure", "beta", email="ops@beta.test", webhook_url="https://hooks.beta.test/x",
                     webhook_secret="s3cret")
    assert configured.outcome == "applied", configured
    assert run(ledger, "usage.debit", "beta", "u1", unit="USD", amount_subunits=15 * 10**9, meter="api_calls",
               at=now.isoformat(), cause={}).outcome == "applied"

    received: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(503 if len(received) < 3 else 200)

    inbox, port = smtp
    smtp_settings = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing")
    [alert] = await process_pending(ledger, smtp_settings, attempts_max=4, transport=httpx.MockTransport(endpoint),
                                    backoff_base_seconds=0.01)
    assert alert["webhook"] is True and alert["email"] is True and alert["available"].startswith("5")
    assert len(received) == 3  # two 503s, then delivered
    timestamp, mac = (part.split("=", 1)[1] for part in received[-1].headers[SIGNATURE_HEADER].split(","))
    expected = hmac.new(b"s3cret", f"{timestamp}.".encode() + received[-1].content, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected)
    [mail] = inbox.messages
    assert mail["To"] == "ops@beta.test" and "Low balance" in mail["Subject"]
    assert await process_pending(ledger, smtp_settings, transport=httpx.MockTransport(endpoint)) == []  # once


@pytest.mark.asyncio
async def test_an_unreachable_endpoint_is_retried_a_bounded_number_of_times(ledger: LedgerApplication) -> None:
    now = datetime.now(UTC)
    run(ledger, "account.open", "gamma", currency="USD", low_balance_threshold="10")
    run(ledger, "credit.grant", "gamma", "g", unit="USD", amount="20", grant_key="g", source="manual",
        effective_at=(now - timedelta(hours=1)).isoformat())
    run(ledger, "alerts.configure", "gamma", webhook_url="https://hooks.gamma.test/x", webhook_secret="k")
    run(ledger, "usage.debit", "gamma", "u1", unit="USD", amount_subunits=15 * 10**9, meter="api_calls",
        at=now.isoformat(), cause={})
    calls = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("refused", request=request)

    [alert] = await process_pending(ledger, None, attempts_max=3, transport=httpx.MockTransport(down),
                                    backoff_base_seconds=0.01)
    assert alert["webhook"] is False and len(calls) == 3
