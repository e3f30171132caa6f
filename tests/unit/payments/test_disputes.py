"""Disputes (chargebacks) in the ledger: a dispute opened moves no money, the funds a gateway withdraws for it leave
clearing for ``disputed_funds`` and come back when it is won, and a lost dispute takes the disputed money's credit
back as a gateway refund the ledger cannot refuse (unspent credit from the wallet, spent credit from revenue, its tax
given back, its bonus voided), in any order of the gateway's notifications and exactly once."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_cli.main import app as cli
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger import reconcile
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.audit import account_events, verify_store
from billing_ledger.domain.checkout import Order
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.unit.payments.support import TENANT, ledger
from tests.unit.payments.test_refund_before_payment import deliver, fresh, notification
from tests.unit.payments.test_top_up_grants import available, books, owed, pay, place, use
from tests.unit.subscriptions import test_invoice_books as invoices
from tests.unit.subscriptions.test_invoice_overage import DEC_1, JAN_1, NOV_1, renew_and_bill, run

__all__ = ["ledger"]


def dispute(kind: str, order: dict[str, Any] | str, amount: str, event: str, *, outcome: str | None = None,
            dispute_id: str = "dp_1", payment: str | None = None, invoice_id: str | None = None) -> PaymentNotification:
    """Ingest's notification of one movement of Stripe dispute ``dispute_id`` (its references as ingest makes them)."""
    order_id = order if isinstance(order, str) else order["order_id"]
    reference = {"dispute_opened": dispute_id, "dispute_closed": f"{dispute_id}/{outcome}"}.get(
        kind, f"txn_{event}")
    return PaymentNotification(
        gateway="stripe", gateway_event_id=event, kind=kind, tenant=TENANT, order_id=order_id, amount=Decimal(amount),
        currency="USD", verified_at=utcnow(), gateway_reference=reference, invoice_id=invoice_id, dispute=dispute_id,
        disputed_payment=payment or (None if isinstance(order, str) else f"pi-{order['key']}"),
        dispute_outcome=outcome)  # type: ignore[arg-type]


def lost(order: dict[str, Any], event: str = "evt_lost") -> PaymentNotification:
    return dispute("dispute_closed", order, order["quote"]["total"], event, outcome="lost")


def status(app: LedgerApplication, key: str = "stripe/dp_1") -> dict[str, Any] | None:
    return app.read(ids.account_id(TENANT), lambda a: a.dispute(key))  # type: ignore[no-any-return]


def order_status(app: LedgerApplication, order: dict[str, Any]) -> str:
    return str(app.read(Order.create_id(TENANT, order["key"]), lambda o: o.status))


def refunds(app: LedgerApplication) -> list[Any]:
    return [e for e in account_events(app, TENANT) if type(e).__name__ == "GrantRefunded"]


def paid_top_up(app: LedgerApplication) -> dict[str, Any]:
    order = place(app, "o1", amount="100")  # 100.00 of credit for 100.00 + 19 % VAT = 119.00
    pay(app, order)
    return order


PAID = {("gateway_clearing", "USD"): Decimal(119), ("tax_payable", "USD"): Decimal(-19),
        ("tenant_wallet", "USD"): Decimal(-100)}


def test_a_dispute_opened_is_recorded_and_moves_no_money(ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    opened = deliver(ledger, dispute("dispute_opened", order, "119.00", "evt_open"))
    assert opened.outcome == "applied", opened
    assert books(ledger) == PAID and available(ledger, "USD") == 100  # the customer keeps the credit meanwhile
    found = status(ledger)
    assert found is not None
    assert (found["status"], found["order_id"], found["payment"], found["withdrawn"]) == (
        "open", order["order_id"], "pi-o1", 0)


@pytest.mark.parametrize(("spent", "from_revenue"), [("0", 0), ("40", 40), ("100", 100)],
                         ids=["unspent", "partly spent", "fully spent"])
def test_a_lost_dispute_takes_the_credit_back_like_a_gateway_refund(ledger: LedgerApplication, spent: str,
                                                                      from_revenue: int) -> None:
    order = paid_top_up(ledger)
    if spent != "0":
        use(ledger, spent, "u1")
    for message in (dispute("dispute_opened", order, "119.00", "evt_open"),
                    dispute("dispute_funds_withdrawn", order, "119.00", "evt_withdrawn")):
        assert deliver(ledger, message).outcome == "applied"
    # Withdrawn: the money left the gateway's clearing while the bank decides; the customer still has the credit.
    assert books(ledger)[("disputed_funds", "USD")] == 119 and ("gateway_clearing", "USD") not in books(ledger)
    result = deliver(ledger, lost(order))
    assert result.outcome == "applied", result
    # Every ledger account back to zero: the unspent credit left the wallet, the spent part came back from revenue,
    # the 19.00 of VAT went back, and the 119.00 left clearing once (the withdrawal became the chargeback).
    assert books(ledger) == {}
    assert available(ledger, "USD") == 0 and owed(ledger) == 0
    [refund] = refunds(ledger)
    assert (refund.from_revenue, refund.tax_amount, refund.cause["dispute"]) == (
        from_revenue * 10**9, 19 * 10**9, "dp_1")
    assert order_status(ledger, order) == "refunded"
    assert status(ledger)["status"] == "lost"  # type: ignore[index]
    assert verify_store(ledger, TENANT).ok


@pytest.mark.parametrize("package", ["usd-100", "credits-10k"])
def test_a_lost_dispute_of_a_package_voids_its_bonus_and_gives_its_money_back_as_a_refund_does(
        ledger: LedgerApplication, package: str) -> None:
    # 100 USD + 20 bonus for 119.00; 10,000 + 1,000 CREDIT for 95.00 + 18.05 VAT, its money booked in USD apart.
    order = place(ledger, "o1", package=package)
    pay(ledger, order)
    assert deliver(ledger, lost(order)).outcome == "applied"
    assert books(ledger) == {}  # clearing, wallet, deferred revenue, tax payable, promotional expense: all zero
    assert available(ledger, "USD") == 0 and available(ledger, "CREDIT") == 0
    money = [e for e in account_events(ledger, TENANT) if type(e).__name__ == "PurchaseMoneyRefunded"]
    assert all(e.cause["dispute"] == "dp_1" for e in money) and len(money) == (package == "credits-10k")


def test_a_won_dispute_changes_nothing_in_the_books_whatever_the_order_of_its_notifications(
        ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    withdrawn = dispute("dispute_funds_withdrawn", order, "119.00", "evt_withdrawn")
    won = dispute("dispute_closed", order, "119.00", "evt_won", outcome="won")
    reinstated = dispute("dispute_funds_reinstated", order, "119.00", "evt_reinstated")
    # The withdrawal arrives first (it opens the dispute), the close before the reinstatement.
    for message in (withdrawn, won, reinstated):
        assert deliver(ledger, message).outcome == "applied"
    assert books(ledger) == PAID and available(ledger, "USD") == 100
    assert status(ledger)["status"] == "won"  # type: ignore[index]
    assert [deliver(ledger, m).outcome for m in (withdrawn, won, reinstated)] == ["duplicate"] * 3
    assert books(ledger) == PAID
    assert verify_store(ledger, TENANT).ok


def test_a_lost_dispute_announced_again_by_another_event_changes_nothing(ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    assert deliver(ledger, lost(order)).outcome == "applied"
    assert deliver(ledger, lost(order)).outcome == "duplicate"  # the same event redelivered
    again = deliver(ledger, lost(order, "evt_lost_again"))  # another event of the same outcome
    assert (again.outcome, again.value["closed"]) == ("applied", False)
    withdrawn_late = deliver(ledger, dispute("dispute_funds_withdrawn", order, "119.00", "evt_withdrawn"))
    assert withdrawn_late.value["withdrawn"] is False  # the chargeback already paid that money out of clearing
    assert books(ledger) == {} and available(ledger, "USD") == 0
    assert len(refunds(ledger)) == 1


def test_a_won_dispute_lost_on_appeal_takes_the_credit_back_then_and_a_lost_one_never_turns(
        ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    assert deliver(ledger, dispute("dispute_closed", order, "119.00", "evt_won", outcome="won")).outcome == "applied"
    assert books(ledger) == PAID
    assert deliver(ledger, lost(order)).outcome == "applied"
    assert books(ledger) == {}
    won_again = deliver(ledger, dispute("dispute_closed", order, "119.00", "evt_won2", outcome="won"))
    assert (won_again.outcome, won_again.reason) == ("rejected", "dispute_outcome_changed")
    assert books(ledger) == {} and status(ledger)["status"] == "lost"  # type: ignore[index]


def test_a_lost_dispute_before_its_payment_ends_as_one_after_it(tmp_path: Path) -> None:
    seen = []
    for name, chargeback_first in (("payment-first", False), ("chargeback-first", True)):
        app = fresh(tmp_path, name)
        try:
            order = place(app, "o1", amount="100")
            payment = notification("payment_succeeded", order["order_id"], "119.00", "evt-o1", "pi-o1")
            messages = [payment, lost(order)]
            for message in reversed(messages) if chargeback_first else messages:
                result = deliver(app, message)
                assert result.outcome == "applied", result
            seen.append((books(app), available(app, "USD"), order_status(app, order),
                         [p.key for p in reconcile.parked_refunds(app, TENANT)], status(app)["status"]))  # type: ignore[index]
            assert verify_store(app, TENANT).ok
        finally:
            app.close()
    assert seen[0] == seen[1] == ({}, 0, "refunded", [], "lost")


def test_a_lost_dispute_of_an_order_already_refunded_takes_nothing_twice(ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    refunded = deliver(ledger, notification("refund_succeeded", order["order_id"], "119.00", "evt_re", "re_1"))
    assert refunded.outcome == "applied"
    result = deliver(ledger, lost(order))
    assert (result.outcome, result.value.get("already_refunded")) == ("applied", True)
    assert books(ledger) == {} and len(refunds(ledger)) == 1


def test_a_chargeback_of_a_payment_without_an_order_refunds_its_purchase_grant(ledger: LedgerApplication) -> None:
    bought = notification("payment_succeeded", "ext-9", "50.00", "evt_pay9", "pi_9")
    assert deliver(ledger, bought).outcome == "applied"
    use(ledger, "20", "u1")
    result = deliver(ledger, dispute("dispute_closed", "ext-9", "50.00", "evt_lost9", outcome="lost",
                                     payment="pi_9"))
    assert result.outcome == "applied", result
    assert books(ledger) == {} and available(ledger, "USD") == 0


def test_a_dispute_in_another_currency_is_rejected(ledger: LedgerApplication) -> None:
    order = paid_top_up(ledger)
    message = dispute("dispute_opened", order, "119.00", "evt_eur").model_copy(update={"currency": "EUR"})
    result: CommandResult = deliver(ledger, message)
    assert (result.outcome, result.reason) == ("rejected", "currency_mismatch")
    assert status(ledger) is None


# -- a dispute of an invoice's payment (dunning's charge) ---------------------------------------------------------


def subscribed(tmp_path: Path) -> LedgerApplication:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "subscribed")))
    run(app, "catalog.publish", None, document=invoices.CATALOG, digest="disputes-1")
    run(app, "account.open", TENANT, currency="USD")
    run(app, "tax_profile.set", TENANT, country="DE")
    return app


def test_a_lost_dispute_of_an_invoice_payment_makes_it_owed_again_and_the_next_renewal_bills_it(
        tmp_path: Path) -> None:
    app = subscribed(tmp_path)
    try:
        run(app, "subscription.create", TENANT, key="m", plan="team")  # 30.00 + 5.70 VAT
        invoice = invoices.first_invoice(app)
        run(app, "invoice.mark_paid", TENANT, at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(invoice.id),
            payment="pi_1")
        paid = invoices.books(app)
        chargeback = dispute("dispute_closed", str(invoice.id), "35.70", "evt_inv_lost", outcome="lost",
                             payment="pi_1", invoice_id=str(invoice.id))
        result = deliver(app, chargeback)
        assert result.outcome == "applied", result
        # The bank took the 35.70 back: it left clearing and is owed again; revenue and tax stay as booked.
        assert invoices.account(app).receivable("USD") == 3570 * invoices.CENT
        chart = invoices.books(app)
        assert ("gateway_clearing", "USD") not in chart and chart[("receivables", "USD")] == 3570 * invoices.CENT
        assert chart[("tax_payable", "USD")] == paid[("tax_payable", "USD")]
        assert deliver(app, chargeback).outcome == "duplicate"
        renewal = renew_and_bill(app, NOV_1, DEC_1, [])
        assert [(x["kind"], x["amount"]) for x in renewal.lines] == [
            ("base_fee", "30.00"), ("overage", "35.70"), ("tax", "5.70")]  # the chargeback is not taxed again
        assert renewal.lines[1]["description"].startswith("Charged back")
        run(app, "invoice.mark_paid", TENANT, at=datetime(2026, 12, 2, tzinfo=UTC), invoice_id=str(renewal.id),
            payment="pi_2")
        assert invoices.account(app).receivable("USD") == 0
        assert renew_and_bill(app, DEC_1, JAN_1, []).total == Decimal("35.70")  # billed once
        assert verify_store(app, TENANT).ok
    finally:
        app.close()


def test_a_dispute_of_another_payment_of_an_invoice_is_rejected_and_nothing_is_owed(tmp_path: Path) -> None:
    app = subscribed(tmp_path)
    try:
        run(app, "subscription.create", TENANT, key="m", plan="team")
        invoice = invoices.first_invoice(app)
        run(app, "invoice.mark_paid", TENANT, at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(invoice.id),
            payment="pi_1")
        other = deliver(app, dispute("dispute_closed", str(invoice.id), "35.70", "evt_other", outcome="lost",
                                     payment="pi_2", invoice_id=str(invoice.id)))
        assert (other.outcome, other.reason) == ("rejected", "dispute_of_other_payment")
        assert invoices.account(app).receivable("USD") == 0
    finally:
        app.close()


# -- any order, any redelivery ------------------------------------------------------------------------------------

MOVEMENTS = ("opened", "withdrawn", "reinstated", "won", "lost")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spent=st.integers(0, 100),
       sequence=st.lists(st.sampled_from(MOVEMENTS), min_size=1, max_size=8).filter(
           lambda seq: "won" in seq or "lost" in seq))
def test_a_disputes_notifications_in_any_order_and_redelivered_end_in_the_books_of_its_outcome(
        spent: int, sequence: list[str]) -> None:
    """Whatever order the gateway's notifications of a dispute come in, each delivered any number of times: every
    posting set balances, nothing stays in disputed_funds once it is closed, and the books are the paid top-up's
    (won: nothing moved in the end) or all zero (lost: the chargeback took back exactly what was paid)."""
    with tempfile.TemporaryDirectory() as directory:
        app = fresh(Path(directory), "ledger")
        try:
            order = paid_top_up(app)
            if spent:
                use(app, str(spent), "u1")
            total = order["quote"]["total"]
            messages = {"opened": dispute("dispute_opened", order, total, "evt_opened"),
                        "withdrawn": dispute("dispute_funds_withdrawn", order, total, "evt_withdrawn"),
                        "reinstated": dispute("dispute_funds_reinstated", order, total, "evt_reinstated"),
                        "won": dispute("dispute_closed", order, total, "evt_won", outcome="won"),
                        "lost": lost(order)}
            for name in sequence:
                assert deliver(app, messages[name]).outcome in ("applied", "duplicate", "rejected")
            chart = books(app)
            assert ("disputed_funds", "USD") not in chart
            if "lost" in sequence:
                assert chart == {} and available(app, "USD") == 0 and order_status(app, order) == "refunded"
                assert status(app)["status"] == "lost"  # type: ignore[index]
            else:
                assert chart.get(("gateway_clearing", "USD")) == 119 and chart[("tax_payable", "USD")] == -19
                assert available(app, "USD") == 100 - spent
            assert verify_store(app, TENANT).ok
        finally:
            app.close()


def test_billing_reconcile_disputes_lists_open_withdrawn_waiting_and_rejected_disputes(tmp_path: Path) -> None:
    """dp_open: opened, nothing withdrawn; dp_held: 59.50 withdrawn, open; dp_over: a chargeback of more than the order
    (rejected); dp_turn: lost, then reported won (rejected); dp_wait: lost before its payment (waiting for it)."""
    app = fresh(tmp_path, "ledger")
    try:
        orders = {key: place(app, key, amount="50") for key in ("o1", "o2", "o3", "o4", "o5")}  # 59.50 each
        for key in ("o1", "o2", "o3", "o4"):
            pay(app, orders[key])
        o1, o2, o3, o4, o5 = orders.values()
        for message, outcome in (
                (dispute("dispute_opened", o1, "59.50", "evt_1", dispute_id="dp_open"), "applied"),
                (dispute("dispute_funds_withdrawn", o2, "59.50", "evt_2", dispute_id="dp_held"), "applied"),
                (dispute("dispute_closed", o3, "70.00", "evt_3", outcome="lost", dispute_id="dp_over"), "rejected"),
                (dispute("dispute_closed", o4, "59.50", "evt_4", outcome="lost", dispute_id="dp_turn"), "applied"),
                (dispute("dispute_closed", o4, "59.50", "evt_5", outcome="won", dispute_id="dp_turn"), "rejected"),
                (dispute("dispute_closed", o5, "59.50", "evt_6", outcome="lost", dispute_id="dp_wait",
                         payment="pi-o5"), "applied")):
            assert deliver(app, message).outcome == outcome
    finally:
        app.close()
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    listed = CliRunner().invoke(cli, ["reconcile", "disputes", "--tenant", TENANT, "--format", "json"], env=env)
    assert listed.exit_code == 1, listed.output
    found = json.loads(listed.output)
    assert [(d["key"], d["amount"], d["withdrawn"], d["order_id"]) for d in found["open"]] == [
        ("stripe/dp_open", "59.50", "0.00", o1["order_id"]), ("stripe/dp_held", "59.50", "59.50", o2["order_id"])]
    assert found["funds_withdrawn"] == ["stripe/dp_held"]
    assert [(r["dispute"], r["order_id"], r["amount"], r["status"]) for r in found["awaiting_payment"]] == [
        ("dp_wait", o5["order_id"], "59.50", "awaiting_payment")]
    assert [(r["kind"], r["reason"], r["command_id"]) for r in found["rejected"]] == [
        ("dispute.closed", "refund_exceeds_order", str(ids.command_id("dispute.closed", "stripe", "evt_3"))),
        ("dispute.closed", "dispute_outcome_changed", str(ids.command_id("dispute.closed", "stripe", "evt_5")))]
    # What each rejected notification named and why, in words (recorded with the rejection since session 14).
    assert [(r["dispute"], r["order_id"], r["amount"]) for r in found["rejected"]] == [
        ("dp_over", o3["order_id"], "70.00"), ("dp_turn", o4["order_id"], "59.50")]
    assert "more than order 'o3'" in found["rejected"][0]["detail"]
    table = CliRunner().invoke(cli, ["reconcile", "disputes", "--tenant", TENANT], env=env)
    assert table.exit_code == 1
    assert "2 open dispute(s), 1 with funds withdrawn" in table.output
    assert "1 lost dispute(s) waiting for their payment" in table.output
    assert "2 dispute notification(s) rejected for reconciliation" in table.output
    none = CliRunner().invoke(cli, ["reconcile", "disputes", "--tenant", "other"], env=env)
    assert (none.exit_code, none.output.splitlines()[0]) == (0, "0 open dispute(s), 0 with funds withdrawn")


def test_reconcile_disputes_reads_the_tenants_rejections_not_every_receipt_of_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command leaves a receipt (most of them usage debits), and receipts are keyed by command id alone: session
    13 found a tenant's rejected dispute notifications by reading every receipt of the store. They are recorded on the
    tenant's own index with the rejection now, and the listing reads no notification log at all."""
    app = fresh(tmp_path, "ledger")
    try:
        order = place(app, "o1", amount="50")
        pay(app, order)
        for index in range(3):
            use(app, "1", f"u{index}")
        over = deliver(app, dispute("dispute_closed", order, "70.00", "evt_over", outcome="lost", dispute_id="dp_over"))
        assert over.outcome == "rejected"
        scans: list[Any] = []
        real = app.recorder.select_notifications
        monkeypatch.setattr(app.recorder, "select_notifications",
                            lambda *args, **kwargs: scans.append(kwargs.get("topics")) or real(*args, **kwargs))
        found = reconcile.disputes(app, [TENANT])
        assert [(r.kind, r.reason, r.dispute) for r in found.rejected] == [
            ("dispute.closed", "refund_exceeds_order", "dp_over")]
        assert scans == []
        # The scan is still there for rejections recorded before the index (--scan-receipts): the same one, once.
        assert [r.command_id for r in reconcile.disputes(app, [TENANT], scan_receipts=True).rejected] == [
            str(ids.command_id("dispute.closed", "stripe", "evt_over"))]
        assert scans
    finally:
        app.close()
