"""An approved refund request reserves the purchased credit until the gateway's refund is booked."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.payment_commands import payment_command

from tests.unit.payments.support import (
    TENANT,
    FakeStripe,
    client,
    command,
    headers,
    ledger,
    run,
    stripe_gateway,
)
from tests.unit.payments.test_checkout_http import URLS, pay

__all__ = ["ledger"]
USD = 10**9  # ledger sub-units per USD


def request(ledger: LedgerApplication, kind: str, **body: Any) -> Any:
    [result] = ledger.apply_commands([command(f"refund_request.{kind}", TENANT, body)])
    return result


def paid_order(ledger: LedgerApplication, *, auto_top_up: bool = False, **body: str) -> dict[str, Any]:
    """A 50.00 top-up (or the checkout ``body``) paid, then its refund requested and approved (``auto_top_up``: a
    low-balance alert and an auto-top-up rule at 10.00 set before the request)."""
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    order = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": "o1"},
                      json={"gateway": "stripe", **URLS, **(body or {"amount": "50"})}).json()
    pay(ledger, api, order)  # 50.00 of credit, 59.50 paid with 19 % VAT
    if auto_top_up:
        assert run(ledger, "low_balance.set", TENANT, "alert", threshold="10").outcome == "applied"
        assert run(ledger, "auto_top_up.set", TENANT, "rule", threshold="10", target="50", cooldown_seconds=0,
                   monthly_cap="500").outcome == "applied"
    assert request(ledger, "create", key="r1", order="o1").outcome == "applied"
    approved = request(ledger, "approve", key="r1")
    assert approved.outcome == "applied", approved
    return order


def debit(ledger: LedgerApplication, key: str, usd: int, policy: str) -> Any:
    return run(ledger, "usage.debit", TENANT, key, unit="USD", amount_subunits=usd * USD, meter="api_calls",
               at=utcnow().isoformat(), cause={}, overage_policy=policy)


def account(ledger: LedgerApplication) -> dict[str, Any]:
    def view(a: BillingAccount) -> dict[str, Any]:
        [purchase] = [g for g in a.grant_balances() if g["source"] == "purchase"]
        return {"balance": a.balance("USD"), "available": a.available("USD"), "held": a.held("USD"),
                "receivable": a.receivable("USD"), "purchase": purchase}
    found = ledger.read(ids.account_id(TENANT), view)
    assert found is not None
    return found


def refund_event(ledger: LedgerApplication) -> Any:
    [event] = [e for e in ledger.events.get(ids.account_id(TENANT)) if isinstance(e, BillingAccount.GrantRefunded)]
    return event


def test_usage_after_approval_cannot_spend_the_credit_being_refunded(ledger: LedgerApplication) -> None:
    paid_order(ledger)
    assert account(ledger)["available"] == 0  # the 50.00 is reserved for the refund

    assert debit(ledger, "u1", 30, "overage").outcome == "applied"  # billed as overage, not from the credit
    blocked = debit(ledger, "u2", 10, "block")  # refused: nothing spendable
    assert account(ledger)["receivable"] == 30 * USD and account(ledger)["purchase"]["remaining"] == 50 * USD, blocked

    done = request(ledger, "complete", key="r1", gateway_refund="re_1")
    assert done.outcome == "applied", done
    assert done.value["status"] == "refunded" and done.value["credit_note"]
    after = account(ledger)
    assert (after["balance"], after["held"], after["receivable"]) == (0, 0, 30 * USD)
    assert after["purchase"]["refunded"] == 50 * USD
    # Exactly the money received goes back: the credit from the wallet, the tax from tax payable.
    event = refund_event(ledger)
    assert (event.amount, event.tax_amount, event.from_wallet, event.from_revenue) == (50 * USD, 95 * USD // 10,
                                                                                       50 * USD, 0)
    assert not event.finance_override


def test_the_gateway_webhook_first_then_complete_finishes_the_request(ledger: LedgerApplication) -> None:
    order = paid_order(ledger)
    webhook = PaymentNotification(gateway="stripe", gateway_event_id="evt-re-1", kind="refund_succeeded", tenant=TENANT,
                                  order_id=order["order_id"], amount=Decimal("59.50"), currency="USD",
                                  verified_at=utcnow(), gateway_reference="re_1")
    [reversed_] = ledger.apply_commands([payment_command(webhook)])
    assert reversed_.outcome == "applied", reversed_
    assert (account(ledger)["balance"], account(ledger)["held"]) == (0, 0)  # the hold went with the reversal

    done = request(ledger, "complete", key="r1", gateway_refund="re_1")
    assert done.outcome == "applied", done  # no longer stuck "approved"
    assert done.value["status"] == "refunded"
    assert done.value["credit_note"] == str(invoice_id(TENANT, f"orders/{order['order_id']}/refund"))
    assert account(ledger)["purchase"]["refunded"] == 50 * USD  # once


def test_approving_a_refund_charges_no_auto_top_up_and_sends_no_low_balance_alert(ledger: LedgerApplication) -> None:
    paid_order(ledger, auto_top_up=True)
    assert (account(ledger)["available"], account(ledger)["held"]) == (0, 50 * USD)  # reserved for the refund
    # The drop is money going back, not spending: charging the card for 50.00 while the customer waits for the
    # 59.50 to come back (or alerting them that their balance is low) is wrong.
    names = [type(e).__name__ for e in ledger.events.get(ids.account_id(TENANT))]
    assert "AutoTopUpRequested" not in names and "LowBalanceReached" not in names


def test_refunding_an_order_with_a_bonus_requests_no_auto_top_up_and_the_rule_stays_armed(
        ledger: LedgerApplication) -> None:
    paid_order(ledger, auto_top_up=True, package="usd-100")  # 100.00 of credit + a 20.00 bonus grant
    done = request(ledger, "complete", key="r1", gateway_refund="re_1")
    assert done.outcome == "applied", done
    after = ledger.read(ids.account_id(TENANT), lambda a: (a.available("USD"),
                                                           sorted((g["remaining"], g["status"]) for g in a.grant_balances())))
    assert after == (0, [(0, "open"), (0, "voided")])  # the credit paid back, the bonus voided with it
    # Voiding the bonus after the refund is still money going back: no card charged for a 50.00 top-up.
    names = [type(e).__name__ for e in ledger.events.get(ids.account_id(TENANT))]
    assert "AutoTopUpRequested" not in names
    # The rule stays armed: the next usage below 10.00 tops up.
    assert debit(ledger, "u1", 1, "overage").outcome == "applied"
    names = [type(e).__name__ for e in ledger.events.get(ids.account_id(TENANT))]
    assert names.count("AutoTopUpRequested") == 1
