"""The invoice.* and subscription.cancel/change commands refuse what is not theirs or not well formed: a
rejection with its reason, recorded, and nothing else changed (SQLite ledger). An exception instead would fail
the whole Kafka batch, retried forever, and block the partition."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_invoice_overage import CATALOG, DEC_1, NOV_1, run, usage_line

GATED_CATALOG: dict[str, Any] = {**CATALOG, "plans": [
    *CATALOG["plans"], {"code": "gated", "name": "Gated", "currency": "USD", "base_fee": "30.00",
                        "collection": "charge_before_access"}]}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=GATED_CATALOG, digest="c1")
    for tenant in ("acme", "other"):
        run(ledger, "account.open", tenant, currency="USD")
        run(ledger, "subscription.create", tenant, key="m", plan="team")
    run(ledger, "subscription.create", "other", key="g", plan="gated")  # incomplete until its invoice is paid
    run(ledger, "usage.debit", "acme", at=NOV_1, unit="USD", amount_subunits=5 * 10**9, meter="api_calls",
        overage_policy="overage", cause={"event_ids": ["e1"], "period": NOV_1.isoformat()})
    run(ledger, "subscription.tick", "acme", at=DEC_1, key="m")  # the renewal draft waits for usage lines
    return ledger


def first_invoice(app: LedgerApplication, tenant: str, key: str = "m") -> Invoice:
    return app.repository.get(invoice_id(tenant, f"{subscription_id(tenant, key)}/{NOV_1.isoformat()}"))


def renewal_draft(app: LedgerApplication) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"))


def changes_since(app: LedgerApplication, position: int) -> list[str]:
    """The topics of the events recorded after ``position``, command receipts left out."""
    found = app.recorder.select_notifications(position + 1, 1000)
    return [n.topic for n in found if "CommandReceipt" not in n.topic]


def test_payment_failed_of_another_tenants_invoice_leaves_its_subscriptions_alone(app: LedgerApplication) -> None:
    theirs, gated = first_invoice(app, "other"), first_invoice(app, "other", "g")
    for invoice in (theirs, gated):
        result = run(app, "invoice.payment_failed", "acme", at=DEC_1, outcome="rejected", invoice_id=str(invoice.id),
                     final=True)
        assert result.reason == "unknown_invoice"
    # Were past_due, and canceled with the gated invoice voided, by a command of tenant acme.
    assert app.repository.get(subscription_id("other", "m")).status == "active"
    assert app.repository.get(subscription_id("other", "g")).status == "incomplete"
    assert first_invoice(app, "other", "g").status == "finalized"
    for kind in ("invoice.mark_paid", "invoice.payment_pending", "invoice.void"):
        result = run(app, kind, "acme", at=DEC_1, outcome="rejected", invoice_id=str(theirs.id), payment="pi_1",
                     attempt=1)
        assert result.reason == "unknown_invoice"
    assert first_invoice(app, "other").status == "finalized"


def draft_lines(**change: Any) -> dict[str, Any]:
    key = f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"
    return {"invoice_key": key, "lines": [usage_line("5.00")], "period_start": NOV_1.isoformat(),
            "period_end": DEC_1.isoformat(), **change}


FIRST = "first"  # replaced by the first invoice's id
MALFORMED: list[tuple[str, str | None, dict[str, Any], str]] = [
    ("subscription.cancel", None, {"key": "m", "immediately": True}, "missing_tenant"),
    ("subscription.change", None, {"key": "m", "quantity": 2}, "missing_tenant"),
    ("invoice.usage_lines", None, draft_lines(), "missing_tenant"),
    ("invoice.usage_lines", "acme", draft_lines(lines=""), "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(lines={}), "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(lines=[{"kind": "usage", "description": None, "amount": "1"}]),
     "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(invoice_key=5), "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(period_start="2026-11-01T00:00:00"), "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(period_start=""), "invalid_command"),
    ("invoice.usage_lines", "acme", draft_lines(period_end="2026-12-01T00:00:00"), "invalid_command"),
    ("invoice.void", "acme", {"invoice_id": 5}, "invalid_command"),
    ("invoice.void", "acme", {"invoice_id": "not-a-uuid"}, "invalid_command"),
    ("invoice.void", None, {"invoice_id": FIRST}, "missing_tenant"),
    ("invoice.payment_failed", "acme", {"invoice_id": ["x"]}, "invalid_command"),
    ("invoice.payment_failed", "acme", {"invoice_id": FIRST, "final": "no"}, "invalid_command"),
    ("invoice.payment_failed", "acme", {"invoice_id": FIRST, "at": "2026-12-01T00:00:00"}, "invalid_command"),
    ("invoice.mark_paid", "acme", {"invoice_id": 1.5}, "invalid_command"),
    ("invoice.payment_pending", "acme", {"invoice_id": FIRST, "payment": "pi_2", "attempt": -1}, "invalid_command"),
    ("invoice.payment_pending", "acme", {"invoice_id": FIRST, "payment": "pi_2", "attempt": 1.5}, "invalid_command"),
    ("invoice.payment_pending", "acme", {"invoice_id": FIRST, "payment": 5, "attempt": 1}, "invalid_command"),
    # Values the old handlers coerced: int(2.5) == 2, int("3") == 3, int(True) == 1, bool("no") is True.
    ("subscription.create", "acme", {"key": "n", "plan": "team", "quantity": 2.5}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "quantity": "3"}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "quantity": True}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "quantity": None}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "trial": "no"}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "trial": 0}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "plan_version": "1"}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "plan_version": 1.0}, "invalid_command"),
    ("subscription.create", "acme", {"key": 5, "plan": "team"}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "workspace": 7}, "invalid_command"),
    ("subscription.create", "acme", {"key": "n", "plan": "team", "time_zone": 1}, "invalid_command"),
    ("subscription.change", "acme", {"key": "m", "quantity": 2.5}, "invalid_command"),
    ("subscription.change", "acme", {"key": "m", "quantity": "3"}, "invalid_command"),
    ("subscription.change", "acme", {"key": "m", "quantity": True}, "invalid_command"),
    ("subscription.change", "acme", {"key": "m", "plan": "team", "plan_version": 1.5}, "invalid_command"),
    ("subscription.cancel", "acme", {"key": "m", "immediately": "no"}, "invalid_command"),
    ("subscription.cancel", "acme", {"key": "m", "immediately": 1}, "invalid_command"),
    ("subscription.cancel", "acme", {"key": "m", "immediately": None}, "invalid_command"),
    ("subscription.pause", "acme", {"key": ["m"]}, "invalid_command"),
    ("payment_method.add", "acme", {"method_id": "pm_1", "default": "no"}, "invalid_command"),
    ("payment_method.add", "acme", {"method_id": 5}, "invalid_command"),
    ("payment_customer.set", "acme", {"gateway": "stripe"}, "invalid_command"),
    ("payment_customer.set", "acme", {"gateway": "stripe", "customer": None}, "invalid_command"),
    ("payment_customer.set", "acme", {"gateway": "stripe", "customer": ""}, "invalid_command"),
    ("payment_customer.set", "acme", {"gateway": "stripe", "customer": 42}, "invalid_command"),
    ("tax_profile.set", "acme", {"country": "DE", "business_name": ["Acme"]}, "invalid_tax_profile"),
    ("alerts.configure", "acme", {"email": "a@acme.example", "enabled": "false"}, "invalid_alerts"),
]


@pytest.mark.parametrize(("kind", "tenant", "payload", "reason"), MALFORMED,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(MALFORMED)])
def test_a_malformed_command_is_rejected_with_its_reason_and_changes_nothing(
        app: LedgerApplication, kind: str, tenant: str | None, payload: dict[str, Any], reason: str) -> None:
    payload = {k: str(first_invoice(app, "acme").id) if v == FIRST else v for k, v in payload.items()}
    position = app.recorder.max_notification_id() or 0
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=DEC_1, issued_by="user:test",
                            payload={"at": DEC_1.isoformat(), **payload})
    [result] = app.apply_commands([command])  # raised, or applied, before
    assert (result.outcome, result.reason) == ("rejected", reason), result
    assert changes_since(app, position) == []
    # The renewal draft still waits for its usage lines (``lines: ""`` finalized it without them), and
    # the subscription and its first invoice are as they were.
    assert renewal_draft(app).status == "draft"
    assert first_invoice(app, "acme").status == "finalized" and first_invoice(app, "acme").pending_payments == {}
    assert app.repository.get(subscription_id("acme", "m")).status == "active"


def test_a_malformed_subscription_command_from_kafka_is_rejected_once_and_its_redelivery_too(
        app: LedgerApplication) -> None:
    """The consumer's path (``apply_commands`` recording rejections): the rejection is recorded with its reason,
    so a redelivery of the same command is a duplicate of a rejected one, and the subscription is as it was
    (quantity 1, not int(2.5) == 2: 2 x 30.00 would have been billed)."""
    command = LedgerCommand(command_id=uuid4(), kind="subscription.change", tenant="acme", issued_at=DEC_1,
                            issued_by="service:test", payload={"key": "m", "quantity": 2.5, "at": DEC_1.isoformat()})
    [first] = app.apply_commands([command])
    [again] = app.apply_commands([command])
    assert (first.outcome, first.reason) == ("rejected", "invalid_command")
    assert "quantity must be a whole number" in (first.detail or "")
    assert (again.outcome, again.first_outcome) == ("duplicate", "rejected")
    sub = app.repository.get(subscription_id("acme", "m"))
    assert (sub.quantity, sub.status) == (1, "active")
    changed = run(app, "subscription.change", "acme", at=DEC_1 + timedelta(days=10), key="m", quantity=2)  # works
    assert changed.outcome == "applied"
    assert app.repository.get(subscription_id("acme", "m")).quantity == 2


def test_well_formed_usage_lines_still_finalize_the_renewal(app: LedgerApplication) -> None:
    run(app, "invoice.usage_lines", "acme", at=DEC_1, **draft_lines())
    draft = renewal_draft(app)
    assert draft.status == "finalized"
    assert [(x["kind"], x["amount"]) for x in draft.lines] == [("base_fee", "30.00"), ("usage", "5.00")]
