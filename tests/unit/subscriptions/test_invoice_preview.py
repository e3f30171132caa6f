"""The invoice preview shows the tax finalizing adds (HTTP route over a SQLite ledger)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.payment_commands import payment_command
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

NOV_1 = datetime(2026, 11, 1, tzinfo=UTC)
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
DEC_3 = datetime(2026, 12, 3, tzinfo=UTC)  # 29 of December's 31 days left
CATALOG: dict[str, Any] = {
    "plans": [{"code": "team", "name": "Team", "currency": "EUR", "base_fee": "30.00"},
              {"code": "team-b", "name": "Team B", "currency": "EUR", "base_fee": "30.00"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing GmbH", "country": "DE"},
}


def run(ledger: LedgerApplication, kind: str, tenant: str | None, at: datetime = NOV_1, **payload: Any) -> Any:
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=at, issued_by="user:test",
                            payload={"at": at.isoformat(), **payload})
    [result] = ledger.apply_commands([command])
    assert result.outcome == "applied", result
    return result


def ledger_with_subscription(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="preview-1")
    run(ledger, "account.open", "acme", currency="EUR")
    run(ledger, "tax_profile.set", "acme", country="DE")  # a consumer in Germany: 19 % VAT
    run(ledger, "subscription.create", "acme", key="m", plan="team", quantity=1)
    return ledger


def preview_of(ledger: LedgerApplication, tmp_path: Path, **params: Any) -> dict[str, Any]:
    app = create_app("t", Settings(data_dir=tmp_path))
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    token = mint_token(Settings(), role="admin")
    response = TestClient(app).get("/v1/accounts/acme/subscriptions/m/invoice-preview", params=params,
                                   headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_the_preview_of_a_change_shows_the_tax_the_invoice_will_carry(tmp_path: Path) -> None:
    ledger = ledger_with_subscription(tmp_path)
    preview = preview_of(ledger, tmp_path, quantity=3, at=NOV_16.isoformat())
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-15.00"), ("proration", "45.00"), ("tax", "5.70")]
    assert (preview["net"], preview["total"]) == ("30.00", "35.70")
    # The change itself bills exactly what was previewed.
    result = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert invoice.total == Decimal(preview["total"])
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


def test_the_preview_gives_back_the_tax_the_corrected_invoice_charged_after_the_rate_changed(
        tmp_path: Path) -> None:
    ledger = ledger_with_subscription(tmp_path)  # 30.00 + 5.70 VAT
    run(ledger, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="US")  # no tax from now on
    preview = preview_of(ledger, tmp_path, quantity=3, at=NOV_16.isoformat())
    # The unused half of the fee comes back with the 2.85 of VAT invoiced on it; the new 45.00 is untaxed (the
    # preview showed no tax at all, 30.00, while the change then billed 27.15).
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-15.00"), ("proration", "45.00"), ("tax", "-2.85")]
    assert (preview["net"], preview["total"], preview["document"]) == ("30.00", "27.15", "invoice")
    result = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=3)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert invoice.total == Decimal(preview["total"])
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]



def test_the_preview_of_a_change_to_a_plan_of_the_same_fee_is_a_zero_invoice_not_a_refusal(tmp_path: Path) -> None:
    ledger = ledger_with_subscription(tmp_path)  # 30.00 + 5.70 VAT
    # It answered 422 tax_rate_changed: the 0.00 net had no tax line, read as a 0 % rate against the 19 % invoiced.
    preview = preview_of(ledger, tmp_path, plan="team-b", at=NOV_16.isoformat())
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-15.00"), ("proration", "15.00"), ("tax", "0.00")]
    assert (preview["net"], preview["total"], preview["document"]) == ("0.00", "0.00", "invoice")


def test_a_malformed_at_or_quantity_is_a_clear_422_not_a_500(tmp_path: Path) -> None:
    """A date without a time and offset (``at=2026-11-16``) raised in the preview and the cycle run (HTTP 500),
    and ``quantity=0`` previewed the unchanged subscription although the change refuses it."""
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="preview-1")
    run(ledger, "account.open", "acme", currency="EUR")
    run(ledger, "subscription.create", "acme", key="m", plan="team", quantity=1)
    app = create_app("t", Settings(data_dir=tmp_path))
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    client = TestClient(app, raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}
    preview = "/v1/accounts/acme/subscriptions/m/invoice-preview"
    # plan_version=-1 (or 0, or without a plan) previewed the unchanged subscription, as if it were not given.
    for params in ({"quantity": 3, "at": "2026-11-16"}, {"at": "garbage"}, {"quantity": 0}, {"plan_version": -1},
                   {"plan": "team-b", "plan_version": 0}, {"plan_version": 1, "quantity": 2}):
        response = client.get(preview, params=params, headers=headers)
        assert response.status_code == 422, (params, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["reason"] == "invalid_command"
    response = client.post("/v1/billing/cycle/run", params={"at": "2026-12-01"}, headers=headers)
    assert response.status_code == 422, response.text
    assert "UTC offset" in response.json()["detail"]
    # A well-formed preview still answers.
    response = client.get(preview, params={"quantity": 3, "at": NOV_16.isoformat()}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["net"] == "30.00"


def test_the_preview_of_a_change_after_the_trial_end_prorates_the_period_it_converts_into(tmp_path: Path) -> None:
    """A 10-day trial (Nov 1 - Nov 11) whose tick has not run: the change ends it first, converted into Nov 11 - Dec 11,
    and prorates that paid period; the preview shows it (it showed nothing to pay, as for a trial's change)."""
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    trial = {"code": "team-trial", "name": "Team", "currency": "EUR", "base_fee": "30.00", "trial_days": 10}
    run(ledger, "catalog.publish", None, document={**CATALOG, "plans": [trial]}, digest="preview-trial")
    run(ledger, "account.open", "acme", currency="EUR")
    run(ledger, "tax_profile.set", "acme", country="DE")
    run(ledger, "payment_method.add", "acme", method_id="pm_1", gateway="stripe", label="visa", default=True)
    run(ledger, "subscription.create", "acme", key="m", plan="team-trial", quantity=1)
    preview = preview_of(ledger, tmp_path, quantity=2, at=NOV_16.isoformat())  # 25 of the period's 30 days left
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-25.00"), ("proration", "50.00"), ("tax", "4.75")]
    result = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


def test_the_preview_of_a_change_after_the_period_end_prorates_the_period_the_renewal_starts(tmp_path: Path) -> None:
    """Nov 1 - Dec 1, the Dec 1 tick not run: a change on Dec 3 renews first and prorates December (29 of 31 days
    left), as the change does; the preview showed nothing to pay (the November period was over)."""
    ledger = ledger_with_subscription(tmp_path)  # 30.00 + 5.70 VAT
    preview = preview_of(ledger, tmp_path, quantity=2, at=DEC_3.isoformat())
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-28.06"), ("proration", "56.13"), ("tax", "5.33")]
    result = run(ledger, "subscription.change", "acme", at=DEC_3, key="m", quantity=2)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


def test_the_preview_of_a_change_after_the_period_end_taxes_the_credit_as_the_renewal_draft_will_be(
        tmp_path: Path) -> None:
    """The change corrects December's renewal, still a draft (taxed by today's profile when finalized), not
    November's invoice: its credit takes today's tax (none, the profile now American), in the preview as in the
    change, not the 19 % November was invoiced at."""
    ledger = ledger_with_subscription(tmp_path)
    run(ledger, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="US")
    preview = preview_of(ledger, tmp_path, quantity=2, at=DEC_3.isoformat())
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [("proration", "-28.06"), ("proration", "56.13")]
    result = run(ledger, "subscription.change", "acme", at=DEC_3, key="m", quantity=2)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


def test_the_preview_after_an_upgrades_invoice_was_voided_credits_what_the_first_invoice_billed(
        tmp_path: Path) -> None:
    ledger = ledger_with_subscription(tmp_path)  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    upgrade = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)  # -15.00 + 30.00
    run(ledger, "invoice.void", "acme", at=NOV_16, reason="goodwill",
        invoice_id=str(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{upgrade.command_id}")))
    nov_21 = datetime(2026, 11, 21, tzinfo=UTC)
    preview = preview_of(ledger, tmp_path, quantity=3, at=nov_21.isoformat())
    # One seat's unused 10 days of the first invoice, the live one (was two seats' of the voided upgrade: -20.00).
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [
        ("proration", "-10.00"), ("proration", "30.00"), ("tax", "3.80")]
    result = run(ledger, "subscription.change", "acme", at=nov_21, key="m", quantity=3)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert invoice.total == Decimal(preview["total"]) == Decimal("23.80")
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


def test_the_preview_after_the_periods_invoice_was_voided_bills_the_new_plans_rest_with_no_credit(
        tmp_path: Path) -> None:
    ledger = ledger_with_subscription(tmp_path)  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    run(ledger, "invoice.void", "acme", at=datetime(2026, 11, 2, tzinfo=UTC), reason="goodwill",
        invoice_id=str(invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}")))
    preview = preview_of(ledger, tmp_path, quantity=2, at=NOV_16.isoformat())
    # Two seats for Nov 16 - Dec 1 and nothing credited (was -15.00 of the voided invoice: 15.00 + 2.85 VAT).
    assert [(x["kind"], x["amount"]) for x in preview["lines"]] == [("proration", "30.00"), ("tax", "5.70")]
    result = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert invoice.total == Decimal(preview["total"]) == Decimal("35.70")
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [(x["kind"], x["amount"]) for x in preview["lines"]]


@pytest.mark.parametrize(("refunded", "credit", "total"), [
    ("35.70", None, "35.70"),  # refunded in full: nothing left to credit (the preview quoted -15.00, total 17.85)
    ("23.80", "-10.00", "23.80"),  # 11.90 left of it: 10.00 + 1.90 VAT credited at most (the preview quoted -15.00)
])
def test_the_preview_after_a_gateway_refund_credits_no_more_than_the_invoice_has_left_to_give_back(
        tmp_path: Path, refunded: str, credit: str | None, total: str) -> None:
    ledger = ledger_with_subscription(tmp_path)  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    first = invoice_id("acme", f"{subscription_id('acme', 'm')}/{NOV_1.isoformat()}")
    run(ledger, "invoice.mark_paid", "acme", invoice_id=str(first), payment="pi_1")
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt_re", kind="refund_succeeded", tenant="acme",
                                 order_id=str(first), invoice_id=str(first), amount=Decimal(refunded),
                                 currency="EUR", verified_at=datetime(2026, 11, 10, tzinfo=UTC),
                                 gateway_reference="re_1", refunded_payment="pi_1")
    [result] = ledger.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result
    preview = preview_of(ledger, tmp_path, quantity=2, at=NOV_16.isoformat())
    # Two seats for Nov 16 - Dec 1 (30.00), less the unused half of November (15.00) only as far as the refund left it.
    credited = [("proration", credit)] if credit else []
    assert [(x["kind"], x["amount"]) for x in preview["lines"] if x["kind"] != "tax"] == [
        *credited, ("proration", "30.00")]
    assert preview["total"] == total
    change = run(ledger, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    invoice = ledger.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{change.command_id}"))
    assert invoice.total == Decimal(preview["total"])
    assert [(x["kind"], x["amount"], x["description"]) for x in invoice.lines] == [
        (x["kind"], x["amount"], x["description"]) for x in preview["lines"]]


def test_the_preview_of_a_cut_below_what_is_allocated_answers_the_changes_refusal(tmp_path: Path) -> None:
    """Two seats of a plan pooling 5 users each, 8 users allocated: cutting to one seat would leave 5. The change is
    refused 409 ``capacity_below_usage``; the preview answered 200 with its prorated lines (-15.00 + 15.00)."""
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, digest="preview-pools", document={
        "plans": [{"code": "team", "name": "Team", "currency": "EUR", "base_fee": "30.00", "resources": {"users": 5}}]})
    run(ledger, "account.open", "acme", currency="EUR")
    run(ledger, "subscription.create", "acme", key="m", plan="team", quantity=2)
    run(ledger, "allocation.allocate", "acme", resource="users", request_id="crew", quantity=8)
    app = create_app("t", Settings(data_dir=tmp_path))
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}
    preview = client.get("/v1/accounts/acme/subscriptions/m/invoice-preview",
                         params={"quantity": 1, "at": NOV_16.isoformat()}, headers=headers)
    command = LedgerCommand(command_id=uuid4(), kind="subscription.change", tenant="acme", issued_at=NOV_16,
                            issued_by="user:test", payload={"at": NOV_16.isoformat(), "key": "m", "quantity": 1})
    [change] = ledger.apply_commands([command])
    assert (change.outcome, change.reason) == ("rejected", "capacity_below_usage")
    assert (preview.status_code, preview.headers["content-type"]) == (409, "application/problem+json"), preview.text
    assert (preview.json()["reason"], preview.json()["detail"]) == (change.reason, change.detail)
    assert preview.json()["type"].endswith("/capacity-below-usage")
    # The same quantity, or a raise, is quoted.
    for quantity in (2, 3):
        assert client.get("/v1/accounts/acme/subscriptions/m/invoice-preview", params={"quantity": quantity},
                          headers=headers).status_code == 200
