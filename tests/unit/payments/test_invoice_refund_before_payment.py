"""A gateway refund of an invoice's payment whose notification comes before that payment (the gateway's webhooks
crossed, or dunning's ``invoice.mark_paid`` is still on its way): it waits on the account naming the invoice, and
whatever pays the invoice applies it in the same transaction, so either order ends in the same books (tax payable
among them), invoice state and credit note, and redeliveries of either change nothing. It was rejected
``invoice_refund_mismatch`` (the invoice was not paid yet) and lost for the books: the revenue and VAT stayed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_cli.main import app as cli
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_ledger import reconcile
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.payment_commands import payment_command, refund_credit_note_key
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.unit.subscriptions.test_invoice_books import CATALOG, NOV_16
from tests.unit.subscriptions.test_invoice_overage import NOV_1, run

TENANT = "acme"
PAID_AT = datetime(2026, 11, 2, 12, tzinfo=UTC)


def fresh(tmp_path: Path, name: str) -> tuple[LedgerApplication, Invoice]:
    """A ledger whose account has November's invoice of a team seat finalized and unpaid: 30.00 + 5.70 VAT."""
    app = LedgerApplication(persistence_env(None, str(tmp_path / name)))
    run(app, "catalog.publish", None, document=CATALOG, digest="books-1")
    run(app, "account.open", TENANT, currency="USD")
    run(app, "tax_profile.set", TENANT, country="DE")
    run(app, "subscription.create", TENANT, key="m", plan="team")
    invoice = document(app, f"{subscription_id(TENANT, 'm')}/{NOV_1.isoformat()}")
    assert (invoice.status, invoice.total) == ("finalized", Decimal("35.70"))
    return app, invoice


def document(app: LedgerApplication, key: str) -> Invoice:
    return app.repository.get(invoice_id(TENANT, key))  # type: ignore[no-any-return]


def paid(invoice: Invoice, at: datetime = PAID_AT, reference: str = "pi_1") -> PaymentNotification:
    return PaymentNotification(gateway="stripe", gateway_event_id=f"evt_{reference}", kind="payment_succeeded",
                               tenant=TENANT, order_id=str(invoice.id), invoice_id=str(invoice.id),
                               amount=invoice.total, currency="USD", verified_at=at, gateway_reference=reference)


def refunded(invoice: Invoice, amount: str, at: datetime, reference: str = "re_1", event: str | None = None,
             of: str | None = "pi_1") -> PaymentNotification:
    return PaymentNotification(gateway="stripe", gateway_event_id=event or f"evt_{reference}", kind="refund_succeeded",
                               tenant=TENANT, order_id=str(invoice.id), invoice_id=str(invoice.id),
                               amount=Decimal(amount), currency="USD", verified_at=at, gateway_reference=reference,
                               refunded_payment=of)


def deliver(app: LedgerApplication, message: PaymentNotification) -> CommandResult:
    [result] = app.apply_commands([payment_command(message)])
    return result


def mark_paid(app: LedgerApplication, invoice: Invoice, at: datetime = PAID_AT) -> CommandResult:
    """Dunning's off-session charge succeeded: it marks the invoice paid with the charge's reference."""
    return run(app, "invoice.mark_paid", TENANT, at=at, invoice_id=str(invoice.id), payment="pi_1")


def books(app: LedgerApplication) -> dict[tuple[str, str], int]:
    postings = [p for e in app.events.get(ids.account_id(TENANT)) for p in getattr(e, "postings", None) or []]
    return {k: v for k, v in account_balances(postings).items() if v}


def outcome(app: LedgerApplication, invoice: Invoice, references: Iterator[str]) -> dict[str, Any]:
    """What a user and finance see: the books, the invoice, its refunds' credit notes, what still waits."""
    now = document(app, invoice.key)
    notes = []
    for reference in references:
        key = invoice_id(TENANT, refund_credit_note_key(invoice, "stripe", reference))
        note = app.repository.get(key) if key in app.repository else None
        notes.append(None if note is None else (note.number, note.total, [(x["kind"], x["amount"]) for x in note.lines],
                                                note.related_invoice))
    account = app.repository.get(ids.account_id(TENANT))
    return {"books": books(app), "invoice": (now.status, now.payment, now.given_back), "notes": notes,
            "receivable": account.receivable("USD"), "available": account.available("USD"),
            "waiting": [p.key for p in reconcile.parked_refunds(app, TENANT)]}


def pay(app: LedgerApplication, invoice: Invoice, by: str) -> None:
    if by == "webhook":
        assert deliver(app, paid(invoice)).outcome == "applied"
    else:  # dunning books its charge first; the gateway's webhook of it follows and changes nothing
        mark_paid(app, invoice)
        assert deliver(app, paid(invoice)).value["already_paid"] is True


def both_orders(tmp_path: Path, amounts: list[str], by: str = "webhook") -> dict[str, Any]:
    """The invoice paid, then refunded ``amounts`` (one gateway refund each), in both delivery orders: the refunds
    after the payment (verified after it), and before it (verified before it, so applied at the payment's time).
    Then every notification is delivered again and each refund announced once more by another event (Stripe's
    refund.updated): the same outcome, which it returns."""
    seen, again = [], []
    for name, first in (("payment-first", False), ("refunds-first", True)):
        app, invoice = fresh(tmp_path, name)
        try:
            hours = [i - len(amounts) if first else i + 1 for i in range(len(amounts))]
            refunds = [refunded(invoice, amount, PAID_AT + timedelta(hours=h), reference=f"re_{i}")
                       for i, (amount, h) in enumerate(zip(amounts, hours, strict=True))]
            if first:
                for refund in refunds:
                    waiting = deliver(app, refund)
                    assert waiting.value["awaiting_payment"] == f"stripe/{refund.gateway_reference}", waiting
                pay(app, invoice, by)
            else:
                pay(app, invoice, by)
                for refund in refunds:
                    assert deliver(app, refund).outcome == "applied"
            references = [f"re_{i}" for i in range(len(amounts))]
            seen.append(outcome(app, invoice, iter(references)))
            assert [deliver(app, m).outcome for m in (paid(invoice), *refunds)] == ["duplicate"] * (len(refunds) + 1)
            for refund in refunds:
                deliver(app, refunded(invoice, str(refund.amount), refund.verified_at, refund.gateway_reference or "",
                                      event=f"{refund.gateway_event_id}_updated"))
            again.append(outcome(app, invoice, iter(references)))
            assert verify_store(app, TENANT).ok, verify_store(app, TENANT).problems
        finally:
            app.close()
    assert seen[1] == seen[0], "the refunds before their payment ended otherwise than after it"
    assert again == seen, "a redelivery changed something"
    return seen[0]


@pytest.mark.parametrize("by", ["webhook", "dunning"])
def test_a_full_refund_before_the_invoices_payment_ends_as_a_refund_after_it(tmp_path: Path, by: str) -> None:
    seen = both_orders(tmp_path, ["35.70"], by)
    # The money went back in full: nothing in the gateway's clearing, no VAT owed, the fee given back.
    assert seen["books"] == {}
    assert seen["invoice"] == ("paid", "pi_1", Decimal("35.70"))
    [(number, total, lines, related)] = seen["notes"]
    assert (number, total, lines) == ("CN-2026-000001", Decimal("-35.70"), [("base_fee", "-30.00"), ("tax", "-5.70")])
    assert related is not None
    assert seen["waiting"] == []


def test_partial_refunds_before_the_invoices_payment_end_as_refunds_after_it(tmp_path: Path) -> None:
    seen = both_orders(tmp_path, ["11.90", "5.95"])
    assert [(n[0], n[1]) for n in seen["notes"]] == [("CN-2026-000001", Decimal("-11.90")),
                                                     ("CN-2026-000002", Decimal("-5.95"))]
    # 17.85 of 35.70 back, VAT in the invoice's proportion: 15.00 + 2.85 left in clearing and owed as VAT.
    assert seen["books"][("gateway_clearing", "USD")] == 1785 * 10**7
    assert seen["books"][("tax_payable", "USD")] == -285 * 10**7
    assert seen["invoice"] == ("paid", "pi_1", Decimal("17.85"))


def test_a_refund_of_another_payment_before_the_invoices_is_rejected_when_it_is_paid_and_listed(
        tmp_path: Path) -> None:
    app, invoice = fresh(tmp_path, "ledger")
    try:
        deliver(app, refunded(invoice, "35.70", PAID_AT - timedelta(hours=1), of="pi_2"))
        result = deliver(app, paid(invoice))
        assert result.outcome == "applied", result
        [settled] = result.value["parked_refunds"]
        assert (settled["outcome"], settled["reason"]) == ("rejected", "refund_of_other_payment")
        # As after the payment: that money never paid the invoice, its revenue and VAT stay; the payment is booked.
        assert books(app) == {("gateway_clearing", "USD"): 3570 * 10**7, ("deferred_revenue", "USD"): -3000 * 10**7,
                              ("tax_payable", "USD"): -570 * 10**7}
        assert document(app, invoice.key).status == "paid"
        [listed] = reconcile.parked_refunds(app, TENANT)
        assert (listed.status, listed.reason, listed.invoice_id, listed.payment) == (
            "rejected", "refund_of_other_payment", str(invoice.id), "pi_1")
    finally:
        app.close()


def test_a_refund_whose_invoice_is_never_paid_waits_listed_and_one_no_payment_could_take_is_rejected_at_once(
        tmp_path: Path) -> None:
    app, invoice = fresh(tmp_path, "ledger")
    try:
        before = books(app)
        too_much = deliver(app, refunded(invoice, "40.00", NOV_16, reference="re_9"))
        assert (too_much.outcome, too_much.reason) == ("rejected", "invoice_refund_mismatch")  # as after a payment
        waiting = deliver(app, refunded(invoice, "35.70", NOV_16))
        assert waiting.value == {"awaiting_payment": "stripe/re_1", "already_awaiting": False}
        assert books(app) == before and document(app, invoice.key).status == "finalized"
    finally:
        app.close()
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    listed = CliRunner().invoke(cli, ["reconcile", "refunds", "--tenant", TENANT], env=env)
    assert listed.exit_code == 1, listed.output
    assert f"stripe/re_1  35.70 USD  invoice {invoice.id}  awaiting_payment" in listed.output
    as_json = CliRunner().invoke(cli, ["reconcile", "refunds", "--tenant", TENANT, "--format", "json"], env=env)
    assert json.loads(as_json.output)[0]["invoice_id"] == str(invoice.id)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cents=st.lists(st.integers(min_value=1, max_value=3570), min_size=1, max_size=3), before=st.integers(0, 3))
def test_any_refunds_of_an_invoices_payment_end_in_the_same_books_wherever_the_payment_comes(
        tmp_path_factory: pytest.TempPathFactory, cents: list[int], before: int) -> None:
    """Gateway refunds of the invoice's payment (each within its total: the gateway checks each; more than it has
    left is taken back from credit or owed), ``before`` of them delivered before the payment: the same books,
    invoice and credit notes as all of them after it."""
    tmp_path = tmp_path_factory.mktemp("orders")
    amounts = [str(Decimal(c) / 100) for c in cents]
    seen = []
    for name, crossed in (("after", 0), ("crossed", min(before, len(amounts)))):
        app, invoice = fresh(tmp_path, name)
        try:
            refunds = [refunded(invoice, amount, PAID_AT + timedelta(hours=i + 1), reference=f"re_{i}")
                       for i, amount in enumerate(amounts)]
            outcomes = [deliver(app, refund) for refund in refunds[:crossed]]
            deliver(app, paid(invoice))
            outcomes += [deliver(app, refund) for refund in refunds[crossed:]]
            assert all(r.outcome == "applied" for r in outcomes), outcomes
            seen.append(outcome(app, invoice, iter(f"re_{i}" for i in range(len(amounts)))))
            assert verify_store(app, TENANT).ok, verify_store(app, TENANT).problems
        finally:
            app.close()
    assert seen[-1] == seen[0]
