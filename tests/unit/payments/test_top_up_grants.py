"""What a paid top-up grants, and from which ledger account: the money received funds the purchase grant (from
the gateway's clearing), what the customer did not pay for (a package's bonus, a discount, a promotion's bonus,
in the promotion's own unit) is a promotional grant; a refund pays back the money and voids the free part."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any
from uuid import UUID

from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.money import SUBUNITS_PER_UNIT
from billing_events.timeutil import utcnow
from billing_ledger.application import CommandResult, LedgerApplication
from billing_ledger.audit import account_events
from billing_ledger.http import build_router
from billing_ledger.payment_commands import payment_command
from billing_runtime.http import create_app
from fastapi.testclient import TestClient

from tests.unit.payments.support import CATALOG, SETTINGS, TENANT, command, headers, ledger, run

__all__ = ["ledger"]
U = SUBUNITS_PER_UNIT


def place_order(app: LedgerApplication, key: str, **payload: Any) -> CommandResult:
    [placed] = app.apply_commands([command("checkout.place", TENANT, {"key": key, "gateway": "stripe", **payload})])
    return placed


def place(app: LedgerApplication, key: str, **payload: Any) -> dict[str, Any]:
    placed = place_order(app, key, **payload)
    assert placed.outcome == "applied", placed
    return dict(placed.value)


def pay(app: LedgerApplication, order: dict[str, Any]) -> None:
    """Stripe's verified webhook for the order's checkout: the notification the ledger consumes."""
    q = order["quote"]
    notification = PaymentNotification(gateway="stripe", gateway_event_id=f"evt-{order['key']}",
                                       kind="payment_succeeded", tenant=TENANT, order_id=order["order_id"],
                                       amount=Decimal(q["total"]), currency=q["currency"], verified_at=utcnow(),
                                       gateway_reference=f"pi-{order['key']}")
    [result] = app.apply_commands([payment_command(notification)])
    assert result.outcome == "applied", result


def books(app: LedgerApplication) -> dict[tuple[str, str], Decimal]:
    """The account's ledger accounts (debit positive) per unit, from every posting it recorded."""
    sums: dict[tuple[str, str], int] = defaultdict(int)
    for event in account_events(app, TENANT):
        for line in getattr(event, "postings", None) or []:
            sums[(line["account"], line["unit"])] += line["amount"]
    return {key: Decimal(amount) / U for key, amount in sums.items() if amount}


def available(app: LedgerApplication, unit: str) -> Decimal:
    return Decimal(app.read(ids.account_id(TENANT), lambda a: a.available(unit))) / U


def test_a_discounted_top_up_books_the_money_received_and_the_discount_as_promotion(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100", promotion="TENOFF")  # 100 - 10 % = 90 + 19 % VAT = 107.10
    assert order["quote"]["total"] == "107.10"
    pay(ledger, order)
    assert available(ledger, "USD") == Decimal(100)  # the customer gets the 100 they were shown
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("107.10"),  # what was paid, not 117.10
                             ("tax_payable", "USD"): Decimal("-17.10"),
                             ("promotional_expense", "USD"): Decimal(10),
                             ("tenant_wallet", "USD"): Decimal(-100)}


def test_a_package_bonus_is_promotional_and_a_refund_pays_back_the_money_and_voids_the_bonus(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", package="usd-100")  # 100 USD + 20 bonus for 100.00 + 19 % = 119.00
    assert order["quote"]["total"] == "119.00"
    pay(ledger, order)
    assert available(ledger, "USD") == Decimal(120)
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal(119), ("tax_payable", "USD"): Decimal(-19),
                             ("promotional_expense", "USD"): Decimal(20), ("tenant_wallet", "USD"): Decimal(-120)}
    grants = ledger.read(ids.account_id(TENANT), lambda a: a.grant_balances())
    assert [(g["source"], Decimal(g["amount"]) / U) for g in grants] == [("purchase", Decimal(100)),
                                                                          ("promotion", Decimal(20))]

    # The gateway refunds the whole payment: exactly the 119.00 received leaves clearing, the bonus is voided.
    refund = PaymentNotification(gateway="stripe", gateway_event_id="evt-refund", kind="refund_succeeded",
                                 tenant=TENANT, order_id=order["order_id"], amount=Decimal("119.00"), currency="USD",
                                 verified_at=utcnow(), gateway_reference="re_1")
    [result] = ledger.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result
    assert available(ledger, "USD") == 0
    assert books(ledger) == {}  # clearing, tax, promotional expense and the wallet all back to zero


def test_a_bonus_credit_promotion_is_granted_in_its_own_unit(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="10", promotion="BONUS500")  # 500 CREDIT on a 10.00 USD top-up
    assert (order["quote"]["promotion_credits"], order["quote"]["promotion_unit"]) == ("500", "CREDIT")
    pay(ledger, order)
    assert available(ledger, "USD") == Decimal(10)  # not 510.00
    assert available(ledger, "CREDIT") == Decimal(500)
    assert books(ledger)[("promotional_expense", "CREDIT")] == Decimal(500)
    assert books(ledger)[("gateway_clearing", "USD")] == Decimal("11.90")


def test_the_top_up_invoice_names_the_unit_a_bonus_promotion_grants(ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="10", promotion="BONUS500")  # 500 CREDIT on a 10.00 USD top-up
    pay(ledger, order)
    invoice_id = ledger.read(UUID(order["order_id"]), lambda o: o.invoice_id)
    lines = ledger.read(UUID(invoice_id), lambda i: list(i.lines))
    assert [item["description"] for item in lines if item["kind"] == "adjustment"] == [
        "Promotion BONUS500: 500 CREDIT bonus"]  # not "500 USD": no USD was given beyond the 10.00 paid


def test_a_promotion_whose_unit_cannot_apply_is_refused_before_anything_is_placed(ledger: LedgerApplication) -> None:
    for key, payload, words in (("eur", {"amount": "20", "promotion": "EUROFF"}, "EUR off; this order is in USD"),
                                ("eur-gift", {"amount": "20", "promotion": "EUROGIFT"}, "grants EUR"),
                                ("free", {"amount": "20", "promotion": "ALLOFF"}, "nothing to pay")):
        refused = place_order(ledger, key, **payload)
        assert (refused.outcome, refused.reason) == ("rejected", "promotion_refused"), refused
        assert words in (refused.detail or ""), refused.detail
    assert available(ledger, "USD") == 0


def test_a_catalogue_whose_promotion_names_an_unknown_unit_is_not_published(ledger: LedgerApplication) -> None:
    document = {**CATALOG, "promotions": [{"code": "TOKENGIFT", "kind": "bonus_credit", "value": "100",
                                           "unit": "TOKENS"}]}
    refused = run(ledger, "catalog.publish", None, document=document, digest="pay-tokens")
    assert refused.outcome == "rejected" and "unknown unit 'TOKENS'" in (refused.detail or ""), refused


def test_a_package_priced_above_the_credit_it_grants_is_not_published(ledger: LedgerApplication) -> None:
    """100 USD of credit sold for 110.00: the 10.00 above the credit would be paid and booked in no account."""
    fee = {"code": "usd-fee", "name": "100 USD (fee incl.)", "unit": "USD", "credits": "100", "price": "110.00",
           "currency": "USD"}
    refused = run(ledger, "catalog.publish", None, document={**CATALOG, "packages": [*CATALOG["packages"], fee]},
                  digest="pay-fee")
    assert (refused.outcome, refused.reason) == ("rejected", "invalid_catalog"), refused
    assert "package 'usd-fee' costs 110.00 USD but grants 100 USD" in (refused.detail or ""), refused.detail
    not_sold = place_order(ledger, "o1", package="usd-fee")  # the catalogue published before is still current
    assert (not_sold.outcome, not_sold.reason) == ("rejected", "unknown_package"), not_sold

    # Priced at the credit it grants, bonus included, it is sold and every cent paid is booked.
    fair = {**fee, "code": "usd-fair", "bonus_credits": "10"}
    assert run(ledger, "catalog.publish", None, document={**CATALOG, "packages": [fair]},
               digest="pay-fair").outcome == "applied"
    order = place(ledger, "o2", package="usd-fair")  # 110.00 + 19 % = 130.90 for 110 USD of credit
    pay(ledger, order)
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("130.90"), ("tax_payable", "USD"): Decimal("-20.90"),
                             ("tenant_wallet", "USD"): Decimal(-110)}


def test_a_partial_refund_of_a_top_up_pays_back_its_share_of_the_vat(ledger: LedgerApplication) -> None:
    """grant.refund (POST /refunds) of a quarter of a 100.00 + 19 % top-up: 25.00 + 4.75, as a credit package's."""
    order = place(ledger, "o1", amount="100")  # 119.00 paid
    pay(ledger, order)
    grant = str(ids.grant_id(TENANT, f"order/{order['order_id']}/purchase"))
    refunded = run(ledger, "grant.refund", TENANT, "r1", grant_id=grant, refund_id=str(ids.grant_id(TENANT, "r1")),
                   amount="25", reason="goodwill")
    assert refunded.outcome == "applied", refunded
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("89.25"),  # 119.00 - 29.75 paid back
                             ("tax_payable", "USD"): Decimal("-14.25"),  # 19 % of the 75.00 still sold
                             ("tenant_wallet", "USD"): Decimal(-75)}
    assert refunded.value["paid_back"] == {"unit": "USD", "amount": 2975 * U // 100, "tax_amount": 475 * U // 100}

    # The gateway's refund of the rest of the order (89.25) reverses the rest of the credit and of the tax, exactly.
    assert refund_order(ledger, order, "89.25").outcome == "applied"
    assert books(ledger) == {}


def refund_order(ledger: LedgerApplication, order: dict[str, Any], amount: str, event: str = "evt-refund",
                 reference: str = "re_1") -> CommandResult:
    """The gateway's verified refund of ``amount`` of the order (Stripe's refund, its own amount, not cumulative)."""
    rest = PaymentNotification(gateway="stripe", gateway_event_id=event, kind="refund_succeeded",
                               tenant=TENANT, order_id=order["order_id"], amount=Decimal(amount), currency="USD",
                               verified_at=utcnow(), gateway_reference=reference)
    [result] = ledger.apply_commands([payment_command(rest)])
    return result


def refund_credit(ledger: LedgerApplication, order: dict[str, Any], key: str, amount: str) -> CommandResult:
    """Finance refunds ``amount`` of the order's purchased credit (``grant.refund``, ``POST /refunds``)."""
    grant = str(ids.grant_id(TENANT, f"order/{order['order_id']}/purchase"))
    refunded = run(ledger, "grant.refund", TENANT, key, grant_id=grant, refund_id=str(ids.grant_id(TENANT, key)),
                   amount=amount, reason="goodwill")
    assert refunded.outcome == "applied", refunded
    return refunded


def order_status(ledger: LedgerApplication, order: dict[str, Any]) -> str:
    return str(ledger.read(UUID(order["order_id"]), lambda o: o.status))


def test_the_gateway_refund_of_what_a_partial_refund_left_of_an_order_reverses_the_rest_once(
        ledger: LedgerApplication) -> None:
    """40.00 of a 100.00 + 19 % top-up refunded by finance (47.60 paid back); then the operator refunds the rest in
    Stripe's dashboard: Stripe reports a refund of 71.40, what was left of the 119.00 paid. It was refused
    (``partial_refund``: only the order's whole total was taken) and the 60.00 of credit and its 11.40 of VAT stayed."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    refund_credit(ledger, order, "r1", "40")
    result = refund_order(ledger, order, "71.40")
    assert result.outcome == "applied", result
    assert books(ledger) == {}  # 119.00 out of clearing in all, the 19.00 of VAT given back, the wallet empty
    assert (available(ledger, "USD"), order_status(ledger, order)) == (0, "refunded")
    # The same refund announced again (refund.updated after refund.created): nothing given back twice.
    again = refund_order(ledger, order, "71.40", event="evt-refund-updated")
    assert (again.outcome, again.value.get("already_refunded")) == ("applied", True)
    assert refund_order(ledger, order, "71.40").outcome == "duplicate"
    assert books(ledger) == {}


def test_the_gateway_refund_of_a_packages_rest_after_its_credit_was_partly_refunded_and_spent(
        ledger: LedgerApplication) -> None:
    """11,000 CREDIT for 95.00 + 18.05 VAT: finance refunds 4,400 (38.00 + 7.22 paid back), 1,100 are spent; the
    gateway's refund of the rest, 67.83, reverses the rest of the credit (the spent part from revenue, as a full
    refund's) and of the money and VAT: all 113.05 taken in went back, never more."""
    order = place(ledger, "o1", package="credits-10k")
    assert order["quote"]["total"] == "113.05"
    pay(ledger, order)
    paid_back = refund_credit(ledger, order, "r1", "4400").value["paid_back"]
    assert paid_back == {"unit": "USD", "amount": 4522 * U // 100, "tax_amount": 722 * U // 100}
    result = run(ledger, "usage.debit", TENANT, key="u1", unit="CREDIT", amount_subunits=1100 * U, meter="api_calls",
                 at=utcnow().isoformat(), cause={"event_ids": ["u1"]})
    assert result.outcome == "applied", result
    assert refund_order(ledger, order, "68.00").reason == "refund_exceeds_order"
    assert refund_order(ledger, order, "67.83", event="evt-rest").outcome == "applied"
    usd = {account: amount for (account, unit), amount in books(ledger).items() if unit == "USD"}
    assert usd == {}  # clearing, deferred revenue and tax payable in USD back to zero: 45.22 + 67.83 = 113.05
    assert available(ledger, "CREDIT") == 0 and order_status(ledger, order) == "refunded"


def test_a_retried_refund_of_package_credit_answers_the_money_it_paid_back(ledger: LedgerApplication) -> None:
    """POST /refunds of 4,400 of 11,000 CREDIT bought for 95.00 + 18.05 VAT: the retry's answer names the 45.22 (7.22
    VAT) to pay back through the gateway, as the first did (the money is booked apart from the credit)."""
    order = place(ledger, "o1", package="credits-10k")
    pay(ledger, order)
    api = create_app("ledger-refunds-test", SETTINGS)
    api.include_router(build_router(ledger))
    http = TestClient(api)
    grant = str(ids.grant_id(TENANT, f"order/{order['order_id']}/purchase"))
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "4400", "reason": "goodwill"}
    first = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=headers("finance", None))
    assert first.status_code == 201, first.text
    assert first.json()["paid_back"] == {"unit": "USD", "amount": "45.22", "tax": "7.22"}
    again = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=headers("finance", None))
    assert again.status_code == 200 and again.json() == first.json()
    assert available(ledger, "CREDIT") == 6600


def test_a_gateway_refund_of_an_order_above_or_below_what_is_left_is_refused_and_changes_nothing(
        ledger: LedgerApplication) -> None:
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    refund_credit(ledger, order, "r1", "40")
    before = books(ledger)
    whole = "is more than the 71.40 USD left of order 'o1' (119.00 paid, 47.60 paid back by earlier refunds)"
    for amount, reason, words in (("119.00", "refund_exceeds_order", whole),
                                  ("71.41", "refund_exceeds_order", "more than the 71.40 USD left"),
                                  ("30.00", "partial_refund", "part of the 71.40 USD left")):
        refused = refund_order(ledger, order, amount, event=f"evt-{amount}")
        assert (refused.outcome, refused.reason) == ("rejected", reason), refused
        assert words in (refused.detail or ""), refused.detail
    assert books(ledger) == before and available(ledger, "USD") == Decimal(60)
    assert order_status(ledger, order) == "paid"


def test_the_gateway_payout_of_a_half_refund_is_not_taken_for_the_rest_of_the_order(ledger: LedgerApplication) -> None:
    """Finance refunds half of a 100.00 + 19 % top-up (59.50) and pays it back in the gateway's dashboard: the gateway
    reports that refund, 59.50, which is also what is left. It cannot be told from the rest's refund, so it is
    refused for reconciliation (taken for the rest, the customer's other half would be reversed unpaid)."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    refund_credit(ledger, order, "r1", "50")
    before = books(ledger)
    refused = refund_order(ledger, order, "59.50")
    assert (refused.outcome, refused.reason) == ("rejected", "ambiguous_refund"), refused
    assert books(ledger) == before and available(ledger, "USD") == Decimal(50)


def test_partial_refunds_of_a_top_up_pay_back_whole_cents_and_in_all_exactly_what_was_paid(
        ledger: LedgerApplication) -> None:
    """Two refunds of 33.33 of a 100.00 + 19 % top-up: 33.33 + 6.33 each (the running share of the VAT floored to the
    cent: it was 6.3327, which no gateway can pay back), then the order's reversal the rest, 33.34 + 6.34."""
    order = place(ledger, "o1", amount="100")  # 119.00 paid
    pay(ledger, order)
    grant = str(ids.grant_id(TENANT, f"order/{order['order_id']}/purchase"))
    paid_back = []
    for key in ("r1", "r2"):
        refunded = run(ledger, "grant.refund", TENANT, key, grant_id=grant, refund_id=str(ids.grant_id(TENANT, key)),
                       amount="33.33", reason="goodwill")
        assert refunded.outcome == "applied", refunded
        paid_back.append(refunded.value["paid_back"])
    assert paid_back == [{"unit": "USD", "amount": 3966 * U // 100, "tax_amount": 633 * U // 100}] * 2
    assert books(ledger) == {("gateway_clearing", "USD"): Decimal("39.68"),  # 119.00 - 2 x 39.66
                             ("tax_payable", "USD"): Decimal("-6.34"), ("tenant_wallet", "USD"): Decimal("-33.34")}
    # A refund finer than the cent is refused, and changes nothing.
    finer = run(ledger, "grant.refund", TENANT, "r3", grant_id=grant, refund_id=str(ids.grant_id(TENANT, "r3")),
                amount="1.005", reason="goodwill")
    assert (finer.outcome, finer.reason) == ("rejected", "invalid_command"), finer
    assert "minor unit" in finer.detail
    assert books(ledger)[("gateway_clearing", "USD")] == Decimal("39.68")
    # The gateway's refund of the rest of the order gives it back: 119.00 in all, exactly.
    assert refund_order(ledger, order, "39.68").outcome == "applied"
    assert books(ledger) == {}


def use(app: LedgerApplication, amount: str, key: str) -> None:
    """Usage rating priced at ``amount`` USD (overage policy: what credit does not cover is owed)."""
    result = run(app, "usage.debit", TENANT, key=key, unit="USD", amount_subunits=int(Decimal(amount) * U),
                 meter="api_calls", at=utcnow().isoformat(), overage_policy="overage",
                 cause={"event_ids": [key], "period": utcnow().strftime("%Y-%m")})
    assert result.outcome == "applied", result


def owed(app: LedgerApplication) -> Decimal:
    return Decimal(app.read(ids.account_id(TENANT), lambda a: a.receivable("USD"))) / U


def test_the_gateway_refund_of_an_order_whose_usage_was_given_back_and_spent_again_pays_back_the_order_once(
        ledger: LedgerApplication) -> None:
    """100.00 + 19 % VAT bought by checkout, all of it used, 60.00 of the usage given back, 25.00 spent again; then
    the gateway refunds the order (119.00). An order's purchase grant never lapses, so the give-back credited the
    grant itself (no usage_reversal credit to take back): the refund takes its 35.00 left from the wallet, the 65.00
    used from revenue, the VAT from tax payable, and nothing is owed."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    use(ledger, "100", "u1")
    use(ledger, "-60", "u2")
    use(ledger, "25", "u3")
    assert (available(ledger, "USD"), owed(ledger)) == (Decimal(35), 0)
    assert refund_order(ledger, order, "119.00").outcome == "applied"
    assert (available(ledger, "USD"), owed(ledger), order_status(ledger, order)) == (0, 0, "refunded")
    assert books(ledger) == {}  # 119.00 back out of clearing, the VAT given back, revenue and the wallet at zero
    grants = ledger.read(ids.account_id(TENANT), lambda a: a.grant_balances())
    assert [g["source"] for g in grants] == ["purchase"]  # no usage_reversal credit was ever given


def test_a_top_up_first_pays_off_what_a_pay_as_you_go_account_owes(ledger: LedgerApplication) -> None:
    use(ledger, "5.00", "u1")  # no credit, no subscription: 5.00 owed, and no invoice will ever bill it
    assert (available(ledger, "USD"), owed(ledger)) == (0, Decimal(5))
    pay(ledger, place(ledger, "o1", amount="20"))
    assert (available(ledger, "USD"), owed(ledger)) == (Decimal(15), 0)
    assert ("receivables", "USD") not in books(ledger)  # owed and repaid: nothing left
    # A payment without a checkout order (a payment link) repays too, at most what it brings.
    use(ledger, "40.00", "u2")  # 15 from credit, 25 owed
    notification = PaymentNotification(gateway="stripe", gateway_event_id="evt-link", kind="payment_succeeded",
                                       tenant=TENANT, order_id="link-1", amount=Decimal(10), currency="USD",
                                       verified_at=utcnow(), gateway_reference="pi-link")
    [result] = ledger.apply_commands([payment_command(notification)])
    assert (result.outcome, result.value["overage_repaid"]) == ("applied", "10.000000000")
    assert (available(ledger, "USD"), owed(ledger)) == (0, Decimal(15))


def test_a_subscribed_accounts_overage_waits_for_its_invoice_not_the_next_top_up(ledger: LedgerApplication) -> None:
    plan = {"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"}
    assert run(ledger, "catalog.publish", None, document={**CATALOG, "plans": [plan]}, digest="pay2").outcome == "applied"
    [created] = ledger.apply_commands([command("subscription.create", TENANT, {"key": "m", "plan": "team"})])
    assert created.outcome == "applied", created
    use(ledger, "5.00", "u1")
    before = owed(ledger)
    pay(ledger, place(ledger, "o1", amount="20"))
    assert owed(ledger) == before  # the renewal invoice bills it
