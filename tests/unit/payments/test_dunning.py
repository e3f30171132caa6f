"""Dunning of subscription invoices: off-session charges on the retry schedule (fake Stripe API, injected
clock), the backup method after the default, and past_due with an email at each failed step."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.notifier import SmtpSettings

from tests.support import Inbox
from tests.unit.payments.support import FakeStripe, command, run, stripe_gateway

__all__ = []
TENANT = "dunco"
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG = {"plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"}]}
SCHEDULE = (0, 3, 5)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="dun1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    for method in ("pm_primary", "pm_backup"):
        assert run(app, "payment_method.add", TENANT, method, method_id=method, gateway="stripe",
                   label=method).outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_9").outcome == "applied"
    [created] = app.apply_commands([command("subscription.create", TENANT, {
        "key": "main", "plan": "team", "at": NOV_1.isoformat()})])
    assert created.outcome == "applied", created
    yield app
    app.close()


def first_invoice(app: LedgerApplication) -> Any:
    sub_id = subscription_id(TENANT, "main")
    return app.repository.get(invoice_id(TENANT, f"{sub_id}/{NOV_1.isoformat()}"))


def status(app: LedgerApplication) -> str:
    return str(app.repository.get(subscription_id(TENANT, "main")).status)


def intents(api: FakeStripe) -> list[tuple[str | None, dict[str, str]]]:
    return [(c[2], c[3]) for c in api.calls if c[1] == "/v1/payment_intents"]


@pytest.mark.asyncio
async def test_paid_at_the_first_attempt(ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    invoice = first_invoice(ledger)
    assert (invoice.status, invoice.total) == ("finalized", Decimal("30.00"))
    api = FakeStripe()
    clock = Clock(NOV_1 + timedelta(minutes=1))
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, SmtpSettings("127.0.0.1", port, "b@x", "billing"),
                      SCHEDULE, now=clock)
    assert await dunning.process() == {str(invoice.id): "paid"}
    [(key, form)] = intents(api)
    assert key == f"dunning/{invoice.id}/0/0"
    assert (form["payment_method"], form["amount"], form["currency"], form["customer"]) == (
        "pm_primary", "3000", "usd", "cus_9")
    assert form["off_session"] == "true" and form["confirm"] == "true"
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"
    assert inbox.messages == []
    clock.at += timedelta(days=10)
    assert await dunning.process() == {}  # the Paid event closed it
    assert await Dunning(ledger, {"stripe": stripe_gateway(api)}, None, SCHEDULE, now=clock).process() == {}
    assert len(intents(api)) == 1


@pytest.mark.asyncio
async def test_the_default_method_declines_and_the_backup_pays(ledger: LedgerApplication,
                                                               smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    api = FakeStripe()
    api.declined.add("pm_primary")
    invoice = first_invoice(ledger)
    dunning = Dunning(ledger, {"stripe": stripe_gateway(api)}, SmtpSettings("127.0.0.1", port, "b@x", "billing"),
                      SCHEDULE, now=Clock(NOV_1))
    assert await dunning.process() == {str(invoice.id): "paid"}
    assert [(key, form["payment_method"]) for key, form in intents(api)] == [
        (f"dunning/{invoice.id}/0/0", "pm_primary"), (f"dunning/{invoice.id}/0/1", "pm_backup")]
    assert first_invoice(ledger).status == "paid" and status(ledger) == "active"
    assert inbox.messages == []  # the attempt succeeded: nothing to tell


@pytest.mark.asyncio
async def test_every_attempt_fails_through_the_schedule_then_past_due(ledger: LedgerApplication,
                                                                       smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    api = FakeStripe()
    api.declined.update({"pm_primary", "pm_backup"})
    gateways = {"stripe": stripe_gateway(api)}
    mail = SmtpSettings("127.0.0.1", port, "b@x", "billing", "tenants.test")
    invoice = first_invoice(ledger)
    clock = Clock(NOV_1 + timedelta(hours=1))
    dunning = Dunning(ledger, gateways, mail, SCHEDULE, now=clock)

    assert await dunning.process() == {str(invoice.id): "retry"}  # day 0
    assert status(ledger) == "active" and len(inbox.messages) == 1
    assert await dunning.process() == {}  # not due again before day 3
    clock.at = NOV_1 + timedelta(days=2, hours=23)
    assert await dunning.process() == {}

    clock.at = NOV_1 + timedelta(days=3)
    restarted = Dunning(ledger, gateways, mail, SCHEDULE, now=clock)  # a restart resumes, repeats nothing
    assert await restarted.process() == {str(invoice.id): "retry"}
    assert status(ledger) == "active" and len(inbox.messages) == 2

    clock.at = NOV_1 + timedelta(days=5)
    assert await restarted.process() == {str(invoice.id): "past_due"}
    assert status(ledger) == "past_due" and first_invoice(ledger).status == "finalized"
    assert len(inbox.messages) == 3
    clock.at += timedelta(days=30)
    assert await restarted.process() == {}
    assert await Dunning(ledger, gateways, mail, SCHEDULE, now=clock).process() == {}  # exhausted

    keys = [key for key, _ in intents(api)]
    assert keys == [f"dunning/{invoice.id}/{attempt}/{index}" for attempt in range(3) for index in range(2)]
    first, second, last = inbox.messages
    assert all(m["To"] == f"{TENANT}@tenants.test" for m in inbox.messages)
    assert "attempt 1 of 3" in first.get_payload() and "2026-11-04" in first.get_payload()
    assert "card_declined" in first.get_payload()
    assert "attempt 2 of 3" in second.get_payload() and "2026-11-06" in second.get_payload()
    assert "final" in last["Subject"] and "past due" in last.get_payload()

    # Paid later by other means (a bank transfer recorded by finance): the subscription recovers.
    assert run(ledger, "invoice.mark_paid", TENANT, "manual", invoice_id=str(invoice.id),
               payment="transfer-1").outcome == "applied"
    assert status(ledger) == "active"
