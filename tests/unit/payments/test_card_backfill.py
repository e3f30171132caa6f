"""Payment methods saved before session 13 have no card details: never called expired, no expiry notice, and an
expired default charged before the backups. The backfill asks Stripe (fake API) for them and sends the card updates
the ledger records; from then on the expiry task and off-session charges treat them as any other card. SQLite
ledger, an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.card_backfill import backfill
from billing_ledger.card_expiry_notices import CardExpiryNotices
from billing_ledger.domain.roster import roster_id
from billing_ledger.saved_methods import charge_in_order, method_view

from tests.unit.payments.support import FakeStripe, run, stripe_gateway

__all__: list[str] = []
TENANT = "oldco"
NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "account.open", TENANT, currency="USD").outcome == "applied"
    # Saved as the ledger saved them before session 13: the gateway's token, no card details.
    for method in ("pm_old", "pm_new", "pm_gone"):
        assert run(app, "payment_method.add", TENANT, method, method_id=method, gateway="stripe",
                   label=method).outcome == "applied"
    assert run(app, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_7").outcome == "applied"
    yield app
    app.close()


@pytest.fixture
def api() -> FakeStripe:
    fake = FakeStripe()
    fake.card("pm_old", brand="visa", last4="0005", exp_month=10, exp_year=2026, customer="cus_7")  # expired
    fake.card("pm_new", brand="mastercard", last4="4444", exp_month=12, exp_year=2030, customer="cus_7")
    return fake  # pm_gone: Stripe no longer knows it


def views(app: LedgerApplication) -> dict[str, dict[str, Any]]:
    methods = app.read(roster_id(TENANT), lambda r: [dict(m) for m in r.payment_methods]) or []
    return {m["method_id"]: method_view(m, NOW) for m in methods}


@pytest.mark.asyncio
async def test_the_backfill_records_old_methods_cards_so_an_expired_default_is_noticed_and_charged_last(
        ledger: LedgerApplication, api: FakeStripe) -> None:
    gateways = {"stripe": stripe_gateway(api)}
    notices = CardExpiryNotices(ledger, 30, now=lambda: NOW)
    assert await notices.process() == []  # no card known: nothing expires

    done = await backfill(ledger, gateways, now=NOW)
    assert [(m.method_id, m.outcome, m.attributed) for m in done.methods] == [
        ("pm_old", "card", True), ("pm_new", "card", True), ("pm_gone", "unknown_payment_method", False)]
    assert not done.ok and "pm_gone" in done.methods[2].detail
    assert [c.kind for c in done.commands] == ["payment_method.card_update"] * 2
    # Stripe now names the tenant on both methods: its card updates of them reach the ledger.
    assert [api.objects[f"/v1/payment_methods/{m}"]["metadata"] for m in ("pm_old", "pm_new")] == [
        {"tenant": TENANT}] * 2
    assert [r.outcome for r in ledger.apply_commands(done.commands)] == ["applied", "applied"]
    shown = views(ledger)
    assert (shown["pm_old"]["card"], shown["pm_old"]["expired"]) == (
        {"brand": "visa", "last4": "0005", "exp_month": 10, "exp_year": 2026}, True)
    assert (shown["pm_new"]["expires_at"], shown["pm_new"]["expired"]) == ("2031-01-01T00:00:00-12:00", False)
    assert shown["pm_gone"]["card"] is None

    # The expiry task records the expired default's notice; an off-session charge tries it after the backup.
    [notice] = await notices.process()
    assert (notice["method_id"], notice["notice"]) == ("pm_old", "expired")
    charged = await charge_in_order(ledger, gateways, tenant=TENANT, total=Decimal("10.00"),
                                    currency_code="USD", key_prefix="k", order_ref="o", now=NOW)
    assert charged.charge is not None and charged.charge.ok
    assert [c[3]["payment_method"] for c in api.calls if c[1] == "/v1/payment_intents"] == ["pm_new"]
    assert charged.expired == ("pm_old",)

    # Again: the cards are known, nothing more to send; the same commands would be duplicates.
    again = await backfill(ledger, gateways, now=NOW)
    assert [(m.method_id, m.outcome) for m in again.methods[:2]] == [("pm_old", "already_known"),
                                                                     ("pm_new", "already_known")]
    assert again.commands == []
    assert [r.outcome for r in ledger.apply_commands(done.commands)] == ["duplicate", "duplicate"]


@pytest.mark.asyncio
async def test_a_dry_run_asks_but_marks_nothing_and_a_gateway_outage_is_reported_not_recorded(
        ledger: LedgerApplication, api: FakeStripe) -> None:
    dry = await backfill(ledger, {"stripe": stripe_gateway(api)}, tenants=[TENANT], attribute=False, now=NOW)
    assert [m.outcome for m in dry.methods] == ["card", "card", "unknown_payment_method"]
    assert not [c for c in api.calls if c[0] == "post"]
    original = api._handle

    def down(method: str, path: str, query: str, form: dict[str, str]) -> tuple[bytes, int]:
        if path == "/v1/payment_methods/pm_new":
            return b'{"error": {"type": "api_error", "message": "Stripe is having a bad day"}}', 500
        return original(method, path, query, form)

    api._handle = down  # type: ignore[method-assign]
    outage = await backfill(ledger, {"stripe": stripe_gateway(api)}, tenants=[TENANT], now=NOW)
    assert [m.outcome for m in outage.methods] == ["card", "gateway_unavailable", "unknown_payment_method"]
    assert [c.payload["method_id"] for c in outage.commands] == ["pm_old"]
    # A gateway not enabled here is reported, not guessed.
    assert {m.outcome for m in (await backfill(ledger, {}, now=NOW)).methods} == {"gateway_not_enabled"}


@pytest.mark.asyncio
async def test_the_backfill_marks_each_accounts_gateway_customer_so_stripes_events_about_it_are_attributed(
        ledger: LedgerApplication, api: FakeStripe) -> None:
    """Only the methods were marked (session 14): Stripe's events about a customer (a card saved as its source renewed,
    its deletion) named no tenant. An account given a customer but no method is found too; a customer Stripe no
    longer knows is listed, and the run fails."""
    assert run(ledger, "account.open", "newco", currency="USD").outcome == "applied"
    assert run(ledger, "payment_customer.set", "newco", "cus", gateway="stripe", customer="cus_8").outcome == "applied"
    assert run(ledger, "account.open", "goneco", currency="USD").outcome == "applied"
    assert run(ledger, "payment_customer.set", "goneco", "cus", gateway="stripe",
               customer="cus_gone").outcome == "applied"
    api.customer("cus_8")
    gateways = {"stripe": stripe_gateway(api)}

    dry = await backfill(ledger, gateways, attribute=False, now=NOW)
    assert [(c.tenant, c.outcome) for c in dry.customers] == [(TENANT, "dry_run"), ("newco", "dry_run"),
                                                              ("goneco", "dry_run")]
    assert not [c for c in api.calls if c[0] == "post"]

    done = await backfill(ledger, gateways, now=NOW)
    assert [(c.tenant, c.customer, c.outcome) for c in done.customers] == [
        (TENANT, "cus_7", "marked"), ("newco", "cus_8", "marked"), ("goneco", "cus_gone", "unknown_payment_customer")]
    assert api.objects["/v1/customers/cus_7"]["metadata"] == {"tenant": TENANT}
    assert api.objects["/v1/customers/cus_8"]["metadata"] == {"tenant": "newco"}
    assert not done.ok and "does not know customer cus_gone" in done.customers[2].detail
    assert (await backfill(ledger, {}, tenants=["newco"], now=NOW)).customers[0].outcome == "gateway_not_enabled"
