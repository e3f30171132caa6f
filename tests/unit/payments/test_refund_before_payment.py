"""A gateway refund whose notification comes before the payment it gives back (the gateway's webhooks crossed):
it waits on the account for its payment, which applies it in the same transaction, so either order ends in the
same books, wallet, tax payable and order state, and redeliveries of either change nothing. One whose payment
never comes stays listed for reconciliation."""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_cli.main import app as cli
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger import reconcile
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.domain.checkout import Order
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.payment_commands import payment_command
from typer.testing import CliRunner

from tests.unit.payments.support import TENANT, ledger, setup
from tests.unit.payments.test_top_up_grants import available, books, place

__all__ = ["ledger"]

ORDERS = {"top-up": {"amount": "100"},  # 100.00 + 19 % DE VAT = 119.00
          "currency package": {"package": "usd-100"},  # 100.00 + 19.00, 20.00 bonus credit
          "credit package": {"package": "credits-10k"}}  # 95.00 + 18.05, money booked apart from the credit


def notification(kind: str, order_id: str, amount: str, event: str, reference: str,
                 refunded_payment: str | None = None) -> PaymentNotification:
    return PaymentNotification(gateway="stripe", gateway_event_id=event, kind=kind, tenant=TENANT, order_id=order_id,
                               amount=Decimal(amount), currency="USD", verified_at=utcnow(),
                               gateway_reference=reference, refunded_payment=refunded_payment)


def deliver(app: LedgerApplication, message: PaymentNotification) -> CommandResult:
    [result] = app.apply_commands([payment_command(message)])
    return result


def fresh(tmp_path: Path, name: str) -> LedgerApplication:
    app = LedgerApplication(persistence_env(None, str(tmp_path / name)))
    setup(app)
    return app


def outcome(app: LedgerApplication, order: dict[str, Any] | None) -> dict[str, Any]:
    """What a user sees: the books (tax payable among them), the wallets, the order and its credit note."""
    seen: dict[str, Any] = {"books": books(app), "USD": available(app, "USD"), "CREDIT": available(app, "CREDIT"),
                            "waiting": [p.key for p in reconcile.parked_refunds(app, TENANT)]}
    if order is not None:
        placed = app.read(Order.create_id(TENANT, order["key"]), lambda o: (o.status, o.payment))
        note = app.read(invoice_id(TENANT, f"orders/{order['order_id']}/refund"), lambda n: (n.total, n.status))
        seen.update(order=placed, credit_note=note)
    return seen


Deliveries = Callable[[dict[str, Any] | None], tuple[PaymentNotification, ...]]


def both_orders(tmp_path: Path, deliveries: Deliveries, order: dict[str, Any] | None = None) -> dict[str, Any]:
    """The payment and its refund delivered payment first and refund first (then each delivered again, and the
    refund announced once more by another event, as Stripe's refund.updated): the same outcome, which it returns."""
    seen, redelivered = [], []
    for name, reverse in (("payment-first", False), ("refund-first", True)):
        app = fresh(tmp_path, name)
        try:
            placed = place(app, "o1", **order) if order is not None else None
            payment, refund, updated = deliveries(placed)
            for message in (refund, payment) if reverse else (payment, refund):
                deliver(app, message)
            seen.append(outcome(app, placed))
            assert [deliver(app, m).outcome for m in (payment, refund)] == ["duplicate", "duplicate"]
            deliver(app, updated)
            redelivered.append(outcome(app, placed))
        finally:
            app.close()
    assert seen[1] == seen[0], "the refund before its payment ended otherwise than after it"
    assert redelivered == seen, "a redelivery changed something"
    return seen[0]


@pytest.mark.parametrize("order", list(ORDERS.values()), ids=list(ORDERS))
def test_an_orders_refund_before_its_payment_ends_as_a_refund_after_it(tmp_path: Path, order: dict[str, Any]) -> None:
    def deliveries(placed: dict[str, Any] | None) -> tuple[PaymentNotification, ...]:
        assert placed is not None
        total, oid = placed["quote"]["total"], placed["order_id"]
        return (notification("payment_succeeded", oid, total, "evt_pay", "pi_1"),
                notification("refund_succeeded", oid, total, "evt_refund", "re_1", refunded_payment="pi_1"),
                notification("refund_succeeded", oid, total, "evt_refund_updated", "re_1", refunded_payment="pi_1"))

    seen = both_orders(tmp_path, deliveries, order)
    assert seen["books"] == {}  # clearing, wallet, tax payable, promotional expense: all back to zero
    assert (seen["USD"], seen["CREDIT"], seen["waiting"]) == (0, 0, [])
    assert seen["order"][0] == "refunded" and seen["credit_note"][1] == "finalized"


def test_a_refund_before_the_payment_of_an_order_the_ledger_does_not_know_ends_as_a_refund_after_it(
        tmp_path: Path) -> None:
    def deliveries(placed: dict[str, Any] | None) -> tuple[PaymentNotification, ...]:
        return (notification("payment_succeeded", "ext-order-9", "50.00", "evt_pay9", "pi_9"),
                notification("refund_succeeded", "ext-order-9", "50.00", "evt_ref9", "re_9", refunded_payment="pi_9"),
                notification("refund_succeeded", "ext-order-9", "50.00", "evt_ref9_updated", "re_9",
                             refunded_payment="pi_9"))

    seen = both_orders(tmp_path, deliveries)
    assert (seen["books"], seen["USD"], seen["waiting"]) == ({}, 0, [])


def test_a_refund_whose_payment_never_comes_waits_listed_for_reconciliation_and_moves_nothing(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")
    refund = notification("refund_succeeded", order["order_id"], "119.00", "evt_refund", "re_1", "pi_1")
    waiting = deliver(ledger, refund)
    assert (waiting.outcome, waiting.value) == ("applied", {"awaiting_payment": "stripe/re_1", "already_awaiting": False})
    again = deliver(ledger, notification("refund_succeeded", order["order_id"], "119.00", "evt_refund_updated", "re_1",
                                         "pi_1"))
    assert again.value == {"awaiting_payment": "stripe/re_1", "already_awaiting": True}
    assert books(ledger) == {} and available(ledger, "USD") == 0
    [listed] = reconcile.parked_refunds(ledger, TENANT)
    assert (listed.key, listed.order_id, listed.amount, listed.currency, listed.status) == (
        "stripe/re_1", order["order_id"], "119.00", "USD", "awaiting_payment")
    # A payment of another payment of the order (not the one the refund names) leaves it waiting.
    other = deliver(ledger, notification("payment_succeeded", order["order_id"], "119.00", "evt_pay2", "pi_2"))
    assert other.outcome == "applied" and "parked_refunds" not in other.value
    assert [p.key for p in reconcile.parked_refunds(ledger, TENANT)] == ["stripe/re_1"]
    assert available(ledger, "USD") == Decimal(100)


def test_a_waiting_refund_its_payment_cannot_take_is_rejected_for_reconciliation_and_the_payment_books(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")
    part = deliver(ledger, notification("refund_succeeded", order["order_id"], "50.00", "evt_refund", "re_1", "pi_1"))
    assert part.outcome == "applied"
    paid = deliver(ledger, notification("payment_succeeded", order["order_id"], "119.00", "evt_pay", "pi_1"))
    assert paid.outcome == "applied", paid
    [settled] = paid.value["parked_refunds"]
    assert (settled["outcome"], settled["reason"]) == ("rejected", "partial_refund")
    # As a partial refund after the payment: rejected, nothing of it moved; the payment is booked.
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("119.00"), ("tax_payable", "USD"): Decimal("-19.00"),
                             ("tenant_wallet", "USD"): Decimal(-100)}
    assert ledger.read(Order.create_id(TENANT, "o1"), lambda o: o.status) == "paid"
    [listed] = reconcile.parked_refunds(ledger, TENANT)
    assert (listed.status, listed.reason, listed.payment) == ("rejected", "partial_refund", "pi_1")


def test_billing_reconcile_refunds_lists_the_refunds_not_applied_to_a_payment(tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        order = place(app, "o1", amount="100")
        deliver(app, notification("refund_succeeded", order["order_id"], "119.00", "evt_refund", "re_1", "pi_1"))
    finally:
        app.close()
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    listed = CliRunner().invoke(cli, ["reconcile", "refunds", "--tenant", TENANT, "--format", "json"], env=env)
    assert listed.exit_code == 1, listed.output
    [refund] = json.loads(listed.output)
    assert (refund["key"], refund["amount"], refund["status"]) == ("stripe/re_1", "119.00", "awaiting_payment")
    none = CliRunner().invoke(cli, ["reconcile", "refunds", "--tenant", "other"], env=env)
    assert (none.exit_code, none.output.splitlines()[0]) == (0, "0 gateway refund(s) not applied to a payment")
