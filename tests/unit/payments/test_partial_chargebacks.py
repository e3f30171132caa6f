"""A lost dispute of part of a checkout order's payment: the bank took back only that part, so the ledger takes back
that share of the order (unspent credit first, the spent part from recognised revenue, the tax and the bonus in
proportion), exactly the money taken back leaves the gateway's clearing, and a later chargeback or refund of what is
left reverses the rest, so in all the books come back to zero. It was rejected ``partial_refund`` before: the credit
stayed with the customer while the money had gone."""

from __future__ import annotations

import tempfile
from decimal import Decimal
from pathlib import Path
from typing import Any

from billing_ledger.application import LedgerApplication
from billing_ledger.audit import verify_store
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.payments.support import TENANT, ledger
from tests.unit.payments.test_disputes import dispute, order_status, refunds, status
from tests.unit.payments.test_refund_before_payment import deliver, fresh, notification
from tests.unit.payments.test_top_up_grants import available, books, pay, place, refund_order, use

__all__ = ["ledger"]


def lose(app: LedgerApplication, order: dict[str, Any], amount: str, dispute_id: str = "dp_1") -> Any:
    """The gateway's notifications of a dispute of ``amount`` of the order's payment: funds withdrawn, then lost."""
    withdrawn = deliver(app, dispute("dispute_funds_withdrawn", order, amount, f"evt_w_{dispute_id}",
                                     dispute_id=dispute_id))
    assert withdrawn.outcome == "applied", withdrawn
    return deliver(app, dispute("dispute_closed", order, amount, f"evt_l_{dispute_id}", outcome="lost",
                                dispute_id=dispute_id))


def test_a_lost_dispute_of_half_a_top_up_takes_back_half_its_credit_and_tax_and_the_rest_later(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")  # 100.00 of credit for 119.00 (19 % VAT)
    pay(ledger, order)
    use(ledger, "40", "u1")
    half = lose(ledger, order, "59.50")
    assert half.outcome == "applied", half
    # 59.50 left clearing (59.50 of the 119.00 remain), half the VAT went back, and the 50.00 of credit came out of
    # the 60.00 unspent: the 40.00 spent stays earned.
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("59.50"), ("tax_payable", "USD"): Decimal("-9.50"),
                             ("tenant_wallet", "USD"): Decimal(-10), ("recognised_revenue", "USD"): Decimal(-40)}
    assert available(ledger, "USD") == 10 and order_status(ledger, order) == "paid"
    [refund] = refunds(ledger)
    assert (refund.amount, refund.tax_amount, refund.from_revenue, refund.cause["dispute"]) == (
        50 * 10**9, 950 * 10**7, 0, "dp_1")
    assert status(ledger)["status"] == "lost"  # type: ignore[index]
    # The bank takes back the other half too (another dispute, the same amount as the first: not a payout of it).
    rest = lose(ledger, order, "59.50", dispute_id="dp_2")
    assert rest.outcome == "applied", rest
    assert books(ledger) == {} and available(ledger, "USD") == 0 and order_status(ledger, order) == "refunded"
    assert verify_store(ledger, TENANT).ok


def test_a_partial_chargeback_of_spent_credit_comes_back_from_recognised_revenue(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    use(ledger, "100", "u1")
    assert lose(ledger, order, "59.50").outcome == "applied"
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("59.50"), ("tax_payable", "USD"): Decimal("-9.50"),
                             ("recognised_revenue", "USD"): Decimal(-50)}
    [refund] = refunds(ledger)
    assert refund.from_revenue == 50 * 10**9
    assert verify_store(ledger, TENANT).ok


def test_a_partial_chargeback_of_a_package_voids_its_share_of_the_bonus(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", package="usd-100")  # 100.00 + 20.00 bonus credit for 119.00
    pay(ledger, order)
    assert lose(ledger, order, "29.75").outcome == "applied"  # a quarter
    # 25.00 of the credit and 4.75 of the VAT back; a quarter of the bonus, 5.00, back to promotional expense.
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("89.25"), ("tax_payable", "USD"): Decimal("-14.25"),
                             ("tenant_wallet", "USD"): Decimal(-90), ("promotional_expense", "USD"): Decimal(15)}
    assert available(ledger, "USD") == 90
    assert refund_order(ledger, order, "89.25").outcome == "applied"  # the rest refunded at the gateway
    assert books(ledger) == {} and order_status(ledger, order) == "refunded"
    assert verify_store(ledger, TENANT).ok


def test_a_partial_chargeback_of_a_credit_package_takes_its_share_of_the_credits_and_exactly_the_money(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", package="credits-10k")  # 10,000 + 1,000 CREDIT for 95.00 + 18.05 VAT = 113.05
    pay(ledger, order)
    assert lose(ledger, order, "50.00").outcome == "applied"
    usd = {account: amount for (account, unit), amount in books(ledger).items() if unit == "USD"}
    # 50.00 left clearing: 7.98 of VAT (18.05 x 50 / 113.05, floored to the cent) and 42.02 of the deferred money.
    assert usd == {"gateway_clearing": Decimal("63.05"), "tax_payable": Decimal("-10.07"),
                   "deferred_revenue": Decimal("-52.98")}
    # 10,000 x 50 / 113.05 credits and 1,000 x 50 / 113.05 of the bonus, to the sub-unit.
    assert available(ledger, "CREDIT") == Decimal(11000) - Decimal("4422.821760283") - Decimal("442.282176028")
    assert lose(ledger, order, "63.05", dispute_id="dp_2").outcome == "applied"
    assert books(ledger) == {} and available(ledger, "CREDIT") == 0
    assert verify_store(ledger, TENANT).ok


def test_a_partial_chargeback_before_its_payment_is_applied_by_the_payment(tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        order = place(app, "o1", amount="100")
        waiting = deliver(app, dispute("dispute_closed", order, "59.50", "evt_lost", outcome="lost"))
        assert waiting.value["chargeback"]["awaiting_payment"] == "stripe/dp_1/lost"
        paid = deliver(app, notification("payment_succeeded", order["order_id"], "119.00", "evt-o1", "pi-o1"))
        assert paid.value["parked_refunds"][0]["outcome"] == "applied", paid
        assert books(app) == {("gateway_clearing", "USD"): Decimal("59.50"), ("tax_payable", "USD"): Decimal("-9.50"),
                              ("tenant_wallet", "USD"): Decimal(-50)}
    finally:
        app.close()


def test_a_chargeback_above_what_is_left_of_an_order_is_still_rejected(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    before = books(ledger)
    above = deliver(ledger, dispute("dispute_closed", order, "120.00", "evt_lost", outcome="lost"))
    assert (above.outcome, above.reason) == ("rejected", "refund_exceeds_order")
    assert books(ledger) == before and status(ledger) is None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(package=st.sampled_from([{"amount": "100"}, {"package": "usd-100"}, {"package": "credits-10k"}]),
       spent=st.integers(0, 100), cents=st.lists(st.integers(1, 4000), min_size=1, max_size=3))
def test_partial_chargebacks_then_the_rest_take_back_exactly_what_was_paid(
        package: dict[str, str], spent: int, cents: list[int]) -> None:
    """Any partial chargebacks of an order, any of its credit spent, then a chargeback of what is left: every
    movement balances, clearing is back to zero (exactly the money paid left it) and so is every other account."""
    with tempfile.TemporaryDirectory() as directory:
        app = fresh(Path(directory), "ledger")
        try:
            order = place(app, "o1", **package)
            pay(app, order)
            if spent and "amount" in package:
                use(app, str(spent), "u1")
            left = Decimal(order["quote"]["total"])
            for index, part in enumerate(cents):
                amount = Decimal(part) / 100
                if amount >= left:
                    break
                assert lose(app, order, str(amount), dispute_id=f"dp_{index}").outcome == "applied"
                left -= amount
                assert books(app)[("gateway_clearing", "USD")] == left
            assert lose(app, order, str(left), dispute_id="dp_rest").outcome == "applied"
            assert books(app) == {} and order_status(app, order) == "refunded"
            assert verify_store(app, TENANT).ok
        finally:
            app.close()


def test_a_gateway_refund_of_the_rest_is_booked_when_an_earlier_partial_chargeback_took_the_same_amount(
        ledger: LedgerApplication) -> None:
    """The bank took back half of a 119.00 top-up (59.50, dispute dp_1); the operator then refunds the other half at
    Stripe (refund re_1 of 59.50). It was refused ``ambiguous_refund`` "for a person to check": a chargeback is no
    refund whose payout could come later, and a refund's notification is never a dispute's, so it is the rest's refund
    and reverses the order: the customer keeps none of the credit paid back, clearing and tax end at zero."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    assert lose(ledger, order, "59.50").outcome == "applied"
    rest = refund_order(ledger, order, "59.50")
    assert rest.outcome == "applied", rest
    assert books(ledger) == {} and available(ledger, "USD") == 0 and order_status(ledger, order) == "refunded"
    assert verify_store(ledger, TENANT).ok


def test_a_gateway_refund_of_a_credit_package_s_rest_equal_to_an_earlier_chargeback_is_booked(
        ledger: LedgerApplication) -> None:
    """The same for a package granted in a credit unit (its money booked apart in the currency): of 113.05 paid, the
    bank takes back 50.00 and then 13.05; Stripe's refund of the 50.00 left reverses the order."""
    order = place(ledger, "o1", package="credits-10k")  # 10,000 + 1,000 CREDIT for 113.05
    pay(ledger, order)
    assert lose(ledger, order, "50.00").outcome == "applied"
    assert lose(ledger, order, "13.05", dispute_id="dp_2").outcome == "applied"
    rest = refund_order(ledger, order, "50.00")
    assert rest.outcome == "applied", rest
    assert books(ledger) == {} and available(ledger, "CREDIT") == 0 and order_status(ledger, order) == "refunded"
    assert verify_store(ledger, TENANT).ok
