"""Alert webhook URLs (tenant-set, posted to by the ledger) never reach private addresses (SSRF), unless the
deployment allows them (BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED)."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from billing_ledger.alerts import process_pending
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.payment_profile import payment_profile_id

from tests.unit.payments.support import TENANT, client, headers, ledger, run

__all__ = ["ledger"]
PRIVATE = ["http://127.0.0.1:8080/hook", "https://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data/",
           "http://[::1]/hook", "http://localhost:9000/hook", "http://[::ffff:127.0.0.1]/x", "http://192.168.0.5/x"]


@pytest.mark.parametrize("url", PRIVATE)
def test_a_private_webhook_url_is_refused_when_set(ledger: LedgerApplication, url: str) -> None:
    http = client(ledger, {})
    response = http.put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                        json={"webhook_url": url, "webhook_secret": "k"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "not public" in response.json()["detail"] or "local" in response.json()["detail"]
    assert ledger.read(payment_profile_id(TENANT), lambda p: dict(p.alerts)) in (None, {})


def test_a_public_webhook_url_is_accepted(ledger: LedgerApplication) -> None:
    response = client(ledger, {}).put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                                      json={"webhook_url": "https://93.184.215.14/hook", "webhook_secret": "k"})
    assert response.status_code == 200, response.text


def test_private_targets_are_allowed_when_the_deployment_says_so(ledger: LedgerApplication,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED", "true")
    response = client(ledger, {}).put(f"/v1/accounts/{TENANT}/alerts", headers=headers("admin"),
                                      json={"webhook_url": "http://10.0.0.7/hook", "webhook_secret": "k"})
    assert response.status_code == 200, response.text


async def _low_balance_alert(ledger: LedgerApplication, url: str, monkeypatch: pytest.MonkeyPatch,
                             private_allowed: bool) -> tuple[dict[str, object], list[httpx.Request]]:
    now = datetime.now(UTC)
    run(ledger, "account.open", "delta", currency="USD", low_balance_threshold="10")
    run(ledger, "credit.grant", "delta", "g", unit="USD", amount="20", grant_key="g", source="manual",
        effective_at=(now - timedelta(hours=1)).isoformat())
    monkeypatch.setenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED", "true")  # a name that resolved publicly then
    assert run(ledger, "alerts.configure", "delta", webhook_url=url, webhook_secret="k").outcome == "applied"
    monkeypatch.delenv("BILLING_OUTBOUND_PRIVATE_TARGETS_ALLOWED")
    run(ledger, "usage.debit", "delta", "u1", unit="USD", amount_subunits=15 * 10**9, meter="api_calls",
        at=now.isoformat(), cause={})
    received: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        received.append(request)
        return httpx.Response(200)

    [alert] = await process_pending(ledger, None, attempts_max=1, transport=httpx.MockTransport(endpoint),
                                    private_allowed=private_allowed)
    return alert, received


@pytest.mark.asyncio
async def test_a_name_resolving_to_a_private_address_at_send_time_is_not_posted_to(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://{socket.gethostname()}:9/hook"  # this machine's name: a loopback or private address
    alert, received = await _low_balance_alert(ledger, url, monkeypatch, private_allowed=False)
    assert alert["webhook"] is False and received == []


@pytest.mark.asyncio
async def test_the_same_name_is_posted_to_when_private_targets_are_allowed(
        ledger: LedgerApplication, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://{socket.gethostname()}:9/hook"
    alert, received = await _low_balance_alert(ledger, url, monkeypatch, private_allowed=True)
    assert alert["webhook"] is True and len(received) == 1
