"""What a low-balance alert states: the balance and threshold in the unit's display digits (docs/money.md), never
the ledger's nine sub-unit decimals: ISO 4217 minor units for a currency, the catalogue scale for a credit type."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from billing_ledger.alerts import process_pending
from billing_ledger.application import LedgerApplication
from billing_ledger.notifier import SmtpSettings

from tests.support import Inbox
from tests.unit.payments.support import ledger, run

__all__ = ["ledger"]


async def _alert(ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> tuple[dict, str, str, dict]:  # type: ignore[type-arg]
    received: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    inbox, port = smtp
    [alert] = await process_pending(ledger, SmtpSettings("127.0.0.1", port, "billing@localhost", "billing"),
                                    transport=httpx.MockTransport(endpoint))
    [mail] = inbox.messages
    [request] = received
    return alert, mail["Subject"], mail.get_payload(decode=True).decode(), json.loads(request.content)


def _open(ledger: LedgerApplication, tenant: str, currency: str, *, grant: str, unit: str | None = None,
          **open_args: str) -> datetime:
    now = datetime.now(UTC)
    assert run(ledger, "account.open", tenant, currency=currency, **open_args).outcome == "applied"
    assert run(ledger, "credit.grant", tenant, "g", unit=unit or currency, amount=grant, grant_key="g",
               source="manual", effective_at=(now - timedelta(hours=1)).isoformat()).outcome == "applied"
    assert run(ledger, "alerts.configure", tenant, email=f"ops@{tenant}.test", webhook_url=f"https://hooks.{tenant}.test/x",
               webhook_secret="k").outcome == "applied"
    return now


@pytest.mark.asyncio
async def test_a_low_balance_alert_states_amounts_in_the_currencys_minor_units(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    now = _open(ledger, "delta", "EUR", grant="225", low_balance_threshold="220")
    assert run(ledger, "usage.debit", "delta", "u1", unit="EUR", amount_subunits=6 * 10**9, meter="api_calls",
               at=now.isoformat(), cause={}).outcome == "applied"
    alert, subject, body, webhook = await _alert(ledger, smtp)
    assert subject == "Low balance: 219.00 EUR", subject
    assert "219.00 EUR, below 220.00" in body, body
    assert (alert["available"], alert["threshold"]) == ("219.00", "220.00")
    assert (webhook["available"], webhook["threshold"], webhook["unit"]) == ("219.00", "220.00", "EUR")


@pytest.mark.asyncio
async def test_a_three_decimal_currency_alert_keeps_its_fils(ledger: LedgerApplication,
                                                            smtp: tuple[Inbox, int]) -> None:
    now = _open(ledger, "kappa", "KWD", grant="20")
    assert run(ledger, "low_balance.set", "kappa", unit="KWD", threshold="10.005").outcome == "applied"
    assert run(ledger, "usage.debit", "kappa", "u1", unit="KWD", amount_subunits=12 * 10**9, meter="api_calls",
               at=now.isoformat(), cause={}).outcome == "applied"
    _, subject, body, webhook = await _alert(ledger, smtp)
    assert subject == "Low balance: 8.000 KWD", subject
    assert "8.000 KWD, below 10.005" in body, body
    assert (webhook["available"], webhook["threshold"]) == ("8.000", "10.005")


@pytest.mark.asyncio
async def test_a_credit_unit_alert_uses_the_catalogue_scale_and_shows_sub_minor_value(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    now = _open(ledger, "sigma", "USD", grant="1000", unit="CREDIT")  # CREDIT: scale 0 in the catalogue
    assert run(ledger, "low_balance.set", "sigma", unit="CREDIT", threshold="500").outcome == "applied"
    assert run(ledger, "usage.debit", "sigma", "u1", unit="CREDIT", amount_subunits=600 * 10**9 + 5 * 10**8,
               meter="api_calls", at=now.isoformat(), cause={}).outcome == "applied"
    _, subject, body, webhook = await _alert(ledger, smtp)
    assert subject == "Low balance: 399.5 CREDIT", subject  # exact: never rounded for display
    assert "399.5 CREDIT, below 500." in body, body
    assert (webhook["available"], webhook["threshold"]) == ("399.5", "500")
