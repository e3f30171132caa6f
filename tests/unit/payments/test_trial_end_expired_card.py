"""A trial's end with an expired default card (seed 004: "backup payment methods: automatic failover"; a trial
converts only with a payment method). An expired card is no payment method there: a valid backup converts the
trial (and dunning charges it first), only expired cards end it unconverted, as without any method. The invoice
preview of a change after the trial's end decides the same way. SQLite ledger, fake Stripe API."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.subscriptions_http import build_router
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.payments.support import FakeStripe, headers, stripe_gateway

__all__: list[str] = []
TENANT = "trialco"
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
TRIAL_END = NOV_1 + timedelta(days=14)
CATALOG = {"plans": [{"code": "trial", "name": "Trial", "currency": "USD", "base_fee": "10.00", "trial_days": 14}]}
EXPIRED = {"brand": "visa", "last4": "0005", "exp_month": 10, "exp_year": 2026}  # ended on 31 October 2026
VALID = {"brand": "mastercard", "last4": "4444", "exp_month": 12, "exp_year": 2030}


def run(app: LedgerApplication, kind: str, at: datetime = NOV_1, **payload: Any) -> CommandResult:
    [result] = app.apply_commands([LedgerCommand(command_id=uuid4(), kind=kind, tenant=TENANT, issued_at=at,
                                                 issued_by="user:test", payload={"at": at.isoformat(), **payload})])
    return result


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    [published] = app.apply_commands([LedgerCommand(command_id=uuid4(), kind="catalog.publish", tenant=None,
                                                    issued_at=NOV_1, issued_by="test",
                                                    payload={"document": CATALOG, "digest": "trial1"})])
    assert published.outcome == "applied", published
    assert run(app, "account.open", currency="USD").outcome == "applied"
    # The default card expired before the trial started (saved long ago, or its renewal never reached the ledger).
    assert run(app, "payment_method.add", method_id="pm_old", gateway="stripe", card=EXPIRED).outcome == "applied"
    assert run(app, "subscription.create", key="t", plan="trial").outcome == "applied"
    assert app.repository.get(subscription_id(TENANT, "t")).status == "trialing"
    yield app
    app.close()


def test_a_trial_whose_only_card_has_expired_ends_unconverted_and_bills_nothing(ledger: LedgerApplication) -> None:
    """It converted: the first invoice (10.00) was finalized and dunned against a card that cannot pay."""
    result = run(ledger, "subscription.tick", at=TRIAL_END, key="t")
    assert result.value == {"transition": "trial_ended"}
    sub = ledger.repository.get(subscription_id(TENANT, "t"))
    assert sub.status == "canceled"
    assert ledger.read(invoice_id(TENANT, f"{sub.id}/{TRIAL_END.isoformat()}"), lambda i: i.status) is None
    assert ledger.repository.get(roster_id(TENANT)).live == []


@pytest.mark.asyncio
async def test_a_valid_backup_converts_the_trial_and_dunning_charges_it_before_the_expired_default(
        ledger: LedgerApplication) -> None:
    assert run(ledger, "payment_method.add", method_id="pm_new", gateway="stripe", card=VALID).outcome == "applied"
    assert run(ledger, "subscription.tick", at=TRIAL_END, key="t").value == {"transition": "trial_converted"}
    sub = ledger.repository.get(subscription_id(TENANT, "t"))
    first = ledger.repository.get(invoice_id(TENANT, f"{sub.id}/{TRIAL_END.isoformat()}"))
    assert (sub.status, first.status, first.total) == ("active", "finalized", 10)
    api = FakeStripe()
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, None, (0, 3), now=lambda: TRIAL_END + timedelta(hours=1))
    assert await dunning.process() == {str(first.id): "paid"}
    assert [c[3]["payment_method"] for c in api.calls if c[1] == "/v1/payment_intents"] == ["pm_new"]


def test_the_preview_of_a_change_after_the_trial_end_does_not_convert_on_an_expired_card(
        ledger: LedgerApplication, tmp_path: Path) -> None:
    """The preview prorated a paid period the change would never bill: the change ends the trial unconverted and is
    refused, and so is its preview now."""
    app = create_app("trial-preview-test", Settings(data_dir=tmp_path))
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing",
                                    gateways={"stripe": stripe_gateway(FakeStripe())}))
    with TestClient(app) as client:
        preview = client.get(f"/v1/accounts/{TENANT}/subscriptions/t/invoice-preview",
                             params={"quantity": 2, "at": (TRIAL_END + timedelta(days=1)).isoformat()},
                             headers=headers(tenant=TENANT))
    assert preview.status_code == 422, preview.text
    assert preview.headers["content-type"].startswith("application/problem+json")
    assert preview.json()["reason"] == "invalid_transition" and "every saved card has expired" in \
        preview.json()["detail"]
    changed = run(ledger, "subscription.change", at=TRIAL_END + timedelta(days=1), key="t", quantity=2)
    assert (changed.outcome, changed.reason) == ("rejected", "invalid_transition")
