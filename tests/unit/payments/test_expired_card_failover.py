"""An expired default card is not charged before the backup (seed 004: "backup payment methods: automatic failover";
"proactive notifications ... for card expirations"): dunning and auto-top-up charge the next method, the account is
warned once, and the expired card is tried only after every other method declined. Fake Stripe API, SQLite ledger,
a real SMTP server, an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.alerts import process_pending
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_expiry_notices import CardExpiryNotices
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.dunning import Dunning
from billing_ledger.notifier import SmtpSettings
from billing_ledger.saved_methods import charge_in_order

from tests.support import Inbox
from tests.unit.payments.support import FakeStripe, command, run, stripe_gateway

__all__: list[str] = []
TENANT = "expco"
NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
CATALOG = {"plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"}]}
OLD_CARD = {"brand": "visa", "last4": "0005", "exp_month": 10, "exp_year": 2026}  # ended on 31 October 2026
NEW_CARD = {"brand": "mastercard", "last4": "4444", "exp_month": 12, "exp_year": 2030}


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="exp1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    for method, card in (("pm_old", OLD_CARD), ("pm_new", NEW_CARD)):  # the expired card is the default
        assert run(app, "payment_method.add", TENANT, method, method_id=method, gateway="stripe",
                   card=card).outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_7").outcome == "applied"
    [created] = app.apply_commands([command("subscription.create", TENANT, {
        "key": "main", "plan": "team", "at": NOV_1.isoformat()}, at=NOV_1)])  # issued then (dated then)
    assert created.outcome == "applied", created
    yield app
    app.close()


def intents(api: FakeStripe) -> list[tuple[str | None, str]]:
    return [(c[2], c[3]["payment_method"]) for c in api.calls if c[1] == "/v1/payment_intents"]


def first_invoice(app: LedgerApplication) -> Any:
    sub_id = subscription_id(TENANT, "main")
    return app.repository.get(invoice_id(TENANT, f"{sub_id}/{NOV_1.isoformat()}"))


@pytest.mark.asyncio
async def test_dunning_skips_an_expired_default_card_for_the_backup_and_warns_the_account_once(
        ledger: LedgerApplication, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    mail = SmtpSettings("127.0.0.1", port, "billing@localhost", "billing", "tenants.test")
    api = FakeStripe()
    invoice = first_invoice(ledger)
    clock = Clock(NOV_1 + timedelta(days=1, hours=12))  # 2 November: October has ended everywhere
    assert await Dunning(ledger, {"stripe": stripe_gateway(api)}, mail, (0, 3, 5), now=clock).process() == {
        str(invoice.id): "paid"}
    # The backup paid at once; the expired default was never charged. Method 1 keeps its idempotency key.
    assert intents(api) == [(f"dunning/{invoice.id}/0/1", "pm_new")]
    assert first_invoice(ledger).status == "paid"
    assert inbox.messages == []  # the invoice was paid: no payment-failed email
    # The account is warned: the expired notice is recorded, the alerts task emails it, and the expiry task does
    # not record it a second time.
    assert await CardExpiryNotices(ledger, 30, now=clock).process() == []
    [alert] = await process_pending(ledger, mail)
    assert (alert["type"], alert["method_id"], alert["email"]) == ("payment_method_expired", "pm_old", True)
    [(to, subject)] = [(m["To"], m["Subject"]) for m in inbox.messages]
    assert (to, subject) == ("expco@tenants.test", "Card expired: Visa 0005 (10/2026)")


@pytest.mark.asyncio
async def test_the_expired_card_is_tried_last_when_every_other_method_declines(ledger: LedgerApplication) -> None:
    # The gateway's account updater may have renewed it without the ledger being told: it is the last resort.
    api = FakeStripe()
    api.declined.add("pm_new")
    charged = await charge_in_order(ledger, {"stripe": stripe_gateway(api)}, tenant=TENANT, total=first_invoice(
        ledger).total, currency_code="USD", key_prefix="k", order_ref="o", now=NOV_1 + timedelta(days=2))
    assert intents(api) == [("k/1", "pm_new"), ("k/0", "pm_old")]
    assert (charged.method_index, charged.gateway, charged.expired) == (0, "stripe", ("pm_old",))
    assert charged.errors == ["Visa 0005: card expired 10/2026, tried after the other methods",
                              "Mastercard 4444: card_declined"]


@pytest.mark.asyncio
async def test_a_card_is_charged_first_until_its_expiry_month_has_ended_everywhere(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    # 1 November 05:00 UTC is still 31 October in Hawaii and at UTC-12: the card is good, the default goes first.
    charged = await charge_in_order(ledger, {"stripe": stripe_gateway(api)}, tenant=TENANT, total=first_invoice(
        ledger).total, currency_code="USD", key_prefix="k", order_ref="o", now=datetime(2026, 11, 1, 5, tzinfo=UTC))
    assert intents(api) == [("k/0", "pm_old")] and charged.expired == ()
    assert ledger.read(roster_id(TENANT), lambda r: r.expiry_notices) == []
