"""A gateway refund the ledger rejects (part of a paid order, more than is left of it, ...) books nothing, but the money
has left at the gateway: its receipt keeps the notification and why, and ``billing reconcile refunds`` lists it, once
per gateway refund, with its reason, next to the refunds still waiting for their payment (exit status 1)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from billing_cli.main import app as cli
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger import reconcile
from typer.testing import CliRunner

from tests.unit.payments.support import TENANT, run
from tests.unit.payments.test_partial_chargebacks import lose
from tests.unit.payments.test_refund_before_payment import deliver, fresh, notification
from tests.unit.payments.test_top_up_grants import books, order_status, pay, place, refund_credit


def reconcile_refunds(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {"BILLING_DATA_DIR": str(tmp_path / "ledger"), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    listed = CliRunner().invoke(cli, ["reconcile", "refunds", *args], env=env)
    return listed.exit_code, listed.output


def test_every_rejected_gateway_refund_is_listed_once_with_its_reason_and_the_books_are_untouched(
        tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        paid = place(app, "o1", amount="100")  # 119.00 paid
        pay(app, paid)
        before = books(app)
        too_much = deliver(app, notification("refund_succeeded", paid["order_id"], "150.00", "evt_r1", "re_1"))
        assert (too_much.outcome, too_much.reason) == ("rejected", "refund_exceeds_order")
        # The gateway announces the same refund again (refund.updated: another event): listed once.
        again = deliver(app, notification("refund_succeeded", paid["order_id"], "150.00", "evt_r1_updated", "re_1"))
        assert again.outcome == "rejected"
        # A redelivery of the first is a duplicate, with the first answer.
        redelivered = deliver(app, notification("refund_succeeded", paid["order_id"], "150.00", "evt_r1", "re_1"))
        assert (redelivered.outcome, redelivered.reason) == ("duplicate", "refund_exceeds_order")
        part = deliver(app, notification("refund_succeeded", paid["order_id"], "20.00", "evt_r2", "re_2"))
        assert (part.outcome, part.reason) == ("rejected", "partial_refund")
        # A refund of an order not paid yet waits for its payment (listed as before).
        unpaid = place(app, "o2", amount="50")
        waiting = deliver(app, notification("refund_succeeded", unpaid["order_id"], "59.50", "evt_r3", "re_3"))
        assert waiting.outcome == "applied"
        # Another tenant's rejected refund (in a currency its account does not keep) is not this tenant's.
        assert run(app, "account.open", "other", currency="USD").outcome == "applied"
        elsewhere = deliver(app, PaymentNotification(
            gateway="stripe", gateway_event_id="evt_r4", kind="refund_succeeded", tenant="other", order_id="o9",
            amount=Decimal("5.00"), currency="EUR", verified_at=utcnow(), gateway_reference="re_4"))
        assert (elsewhere.outcome, elsewhere.reason) == ("rejected", "currency_mismatch")
        assert books(app) == before  # nothing of the rejected refunds was booked
        found = reconcile.rejected_refunds(app, [TENANT])
    finally:
        app.close()
    assert [(r.key, r.amount, r.currency, r.order_id, r.status, r.reason) for r in found] == [
        ("stripe/re_1", "150.00", "USD", paid["order_id"], "rejected", "refund_exceeds_order"),
        ("stripe/re_2", "20.00", "USD", paid["order_id"], "rejected", "partial_refund")]
    assert found[0].command_id == str(too_much.command_id) and "reconcile by hand" in (found[0].detail or "")

    code, output = reconcile_refunds(tmp_path, "--tenant", TENANT)
    lines = output.splitlines()
    assert (code, lines[0]) == (1, "3 gateway refund(s) not applied to a payment")
    assert any("stripe/re_3" in line and "awaiting_payment" in line for line in lines)
    [re_1] = [line for line in lines if "stripe/re_1" in line]
    assert "150.00 USD" in re_1 and "rejected (refund_exceeds_order:" in re_1 and str(too_much.command_id) in re_1
    code, output = reconcile_refunds(tmp_path, "--tenant", TENANT, "--format", "json")
    assert code == 1
    assert sorted((r["key"], r["status"], r["reason"]) for r in json.loads(output)) == [
        ("stripe/re_1", "rejected", "refund_exceeds_order"), ("stripe/re_2", "rejected", "partial_refund"),
        ("stripe/re_3", "awaiting_payment", None)]
    code, output = reconcile_refunds(tmp_path, "--tenant", "other")
    assert code == 1 and "stripe/re_4  5.00 EUR  order o9  rejected (currency_mismatch:" in output
    assert reconcile_refunds(tmp_path, "--tenant", "nobody") == (0, "0 gateway refund(s) not applied to a payment\n")


def test_a_refund_that_may_be_an_earlier_refund_s_payout_is_listed_naming_that_refund_not_the_chargeback(
        tmp_path: Path) -> None:
    """Of a 119.00 top-up finance refunded 30.00 of credit (35.70 with its VAT, to be paid out at the gateway) and the
    bank took back 47.60 (dispute dp_1); 35.70 is left. Stripe then reports a refund of 35.70: it may be the payout of
    finance's refund or the refund of the rest, which nothing in the notification tells apart, so it stays
    ``ambiguous_refund``, books nothing, and ``billing reconcile refunds`` lists it naming finance's refund (who asked
    and why), not the chargeback."""
    app = fresh(tmp_path, "ledger")
    try:
        order = place(app, "o1", amount="100")
        pay(app, order)
        refunded = refund_credit(app, order, "r1", "30")
        assert lose(app, order, "47.60").outcome == "applied"
        before = books(app)
        doubtful = deliver(app, notification("refund_succeeded", order["order_id"], "35.70", "evt_r1", "re_1"))
        assert (doubtful.outcome, doubtful.reason) == ("rejected", "ambiguous_refund"), doubtful
        assert books(app) == before and order_status(app, order) == "paid"
    finally:
        app.close()
    code, output = reconcile_refunds(tmp_path, "--tenant", TENANT)
    [line] = [line for line in output.splitlines() if "stripe/re_1" in line]
    assert code == 1 and "35.70 USD" in line and "rejected (ambiguous_refund:" in line, output
    assert f"the earlier partial refund {refunded.value['refund_id']} (" in line and "goodwill" in line, line
    assert "dp_1" not in line
