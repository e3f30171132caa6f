"""Credit packages granted in a credit unit book the money paid for them, net and tax, in the currency.

The grant is balanced in its credit unit (``CREDIT``); ``book_purchase_money`` books the money in the account's
currency (Dr gateway clearing total / Cr deferred revenue net / Cr tax payable tax), once; every refund of the
grant reverses that booking in proportion to the credit refunded, never more tax than was collected. Through the
checkout commands (``order.paid_off_session``, refund requests) and the ledger's own store, chain and audit.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import export_lines, replay_lines, verify_store
from billing_ledger.domain.account import (
    BillingAccount,
    InvalidAmount,
    InvalidArgument,
    LedgerError,
    MoneyAlreadyBooked,
    RefundExceedsGrant,
    UnitMismatch,
)
from billing_ledger.domain.postings import LedgerAccount, account_balances, assert_balanced, wallet_delta
from eventsourcing.application import Application

from tests.unit.payments.support import TENANT, command, ledger

__all__ = ["ledger"]

U = SUBUNITS_PER_UNIT
CENT = U // 100
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
USD, CREDIT = "USD", "CREDIT"
GC, DR, TAX = (LedgerAccount.GATEWAY_CLEARING.value, LedgerAccount.DEFERRED_REVENUE.value,
               LedgerAccount.TAX_PAYABLE.value)


def at(minutes: int = 0) -> datetime:
    return T0 + timedelta(minutes=minutes)


def new_account() -> BillingAccount:
    account = BillingAccount.open("acme", USD, opened_by="admin@test")
    account.collect_events()
    return account


def buy_credits(account: BillingAccount, key: str = "p1", credits: int = 1000 * U, net: int = 50 * U,
                tax: int = 10 * U) -> UUID:
    """1,000 CREDIT for USD 50 + USD 10 VAT (by default), as ``pay_order`` books a credit package."""
    grant_id = ids.grant_id(account.tenant, key)
    account.grant_credit(grant_id=grant_id, unit=CREDIT, amount=credits, effective_at=T0, expires_at=None,
                         scope=None, source="purchase", cause={"order_id": key}, granted_by="test")
    account.book_purchase_money(grant_id=grant_id, currency=USD, net=net, tax_amount=tax, at=T0,
                                cause={"order_id": key})
    return grant_id


def names(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def refund(account: BillingAccount, grant_id: UUID, amount: int, **kwargs: Any) -> list[Any]:
    account.refund_grant(grant_id=grant_id, amount=amount, refund_id=uuid4(), at=at(5), cause={"r": 1}, **kwargs)
    return account.collect_events()  # type: ignore[no-any-return]


def booked(events: list[Any]) -> dict[tuple[str, str], int]:
    lines = [line for e in events for line in getattr(e, "postings", [])]
    return {k: v for k, v in account_balances(lines).items() if v}


# -- booking ------------------------------------------------------------------------------------------------


def test_a_credit_package_books_its_money_and_tax_in_the_currency_balanced() -> None:
    account = new_account()
    grant_id = buy_credits(account)
    granted, money = account.collect_events()
    assert (type(granted).__name__, type(money).__name__) == ("CreditGranted", "PurchaseMoneyBooked")
    assert granted.tax_amount == 0 and {p["unit"] for p in granted.postings} == {CREDIT}
    assert_balanced(money.postings)
    assert account_balances(money.postings) == {(GC, USD): 60 * U, (DR, USD): -50 * U, (TAX, USD): -10 * U}
    assert (money.unit, money.amount, money.net, money.tax_amount) == (USD, 60 * U, 50 * U, 10 * U)
    assert all(p["grant_id"] == str(grant_id) for p in money.postings)
    assert wallet_delta(money.postings) == {}  # money, not spendable credit: the USD wallet is untouched
    assert account.balance(USD) == 0 and account.balance(CREDIT) == 1000 * U
    assert account.purchase_money(grant_id) == {"unit": USD, "net": 50 * U, "tax": 10 * U, "refunded_net": 0,
                                                "refunded_tax": 0}


def test_the_money_is_booked_once_and_only_for_credit_unit_purchases() -> None:
    account = new_account()
    grant_id = buy_credits(account)
    account.collect_events()
    with pytest.raises(MoneyAlreadyBooked):
        account.book_purchase_money(grant_id=grant_id, currency=USD, net=50 * U, tax_amount=10 * U, at=T0, cause={})
    in_usd = ids.grant_id("acme", "usd")
    account.grant_credit(grant_id=in_usd, unit=USD, amount=50 * U, effective_at=T0, expires_at=None, scope=None,
                         source="purchase", cause={}, granted_by="test", tax_amount=10 * U)
    promo = ids.grant_id("acme", "promo")
    account.grant_credit(grant_id=promo, unit=CREDIT, amount=5 * U, effective_at=T0, expires_at=None, scope=None,
                         source="promotion", cause={}, granted_by="test")
    other = ids.grant_id("acme", "other")
    account.grant_credit(grant_id=other, unit=CREDIT, amount=5 * U, effective_at=T0, expires_at=None, scope=None,
                         source="purchase", cause={}, granted_by="test")
    account.collect_events()
    for grant, currency, net, tax, error in (
        (in_usd, USD, 50 * U, 10 * U, InvalidArgument),  # a currency grant books its tax on the grant
        (promo, USD, U, 0, InvalidArgument),  # free credit has no money behind it
        (other, "EUR", U, 0, UnitMismatch),  # only the account's currency
        (other, CREDIT, U, 0, InvalidArgument),  # money is in a currency
        (other, USD, 0, 0, InvalidAmount),  # nothing paid: nothing to book
        (other, USD, -U, 2 * U, InvalidAmount),
    ):
        with pytest.raises(error):
            account.book_purchase_money(grant_id=grant, currency=currency, net=net, tax_amount=tax, at=T0, cause={})
        assert account.pending_events == []
    refund(account, other, U)
    with pytest.raises(InvalidArgument, match="refunded"):
        account.book_purchase_money(grant_id=other, currency=USD, net=U, tax_amount=0, at=T0, cause={})


# -- refunds ------------------------------------------------------------------------------------------------


def test_a_full_refund_reverses_the_currency_money_and_tax_exactly() -> None:
    account = new_account()
    grant_id = buy_credits(account)
    events = account.collect_events()
    refunded = refund(account, grant_id, 1000 * U)
    assert names(refunded) == ["GrantRefunded", "PurchaseMoneyRefunded"]
    credit_side, money_back = refunded
    assert {p["unit"] for p in credit_side.postings} == {CREDIT} and credit_side.tax_amount == 0
    assert account_balances(money_back.postings) == {(GC, USD): -60 * U, (DR, USD): 50 * U, (TAX, USD): 10 * U}
    assert (money_back.amount, money_back.net, money_back.tax_amount) == (60 * U, 50 * U, 10 * U)
    assert money_back.refund_id == credit_side.refund_id and money_back.grant_id == credit_side.grant_id
    # Every ledger account is back at zero, in both units.
    assert booked(events + refunded) == {}


def test_partial_refunds_reverse_in_proportion_and_never_more_tax_than_collected() -> None:
    account = new_account()
    # Awkward numbers: 3 credits for 0.10 + 0.07 do not divide evenly.
    grant_id = buy_credits(account, credits=3, net=10 * CENT, tax=7 * CENT)
    account.collect_events()
    parts = [refund(account, grant_id, 1)[-1] for _ in range(3)]
    assert names(parts) == ["PurchaseMoneyRefunded"] * 3
    # The running share floored to the cent (never 0.0333333333: a gateway pays back whole cents), the rest last.
    assert [(p.net, p.tax_amount) for p in parts] == [(3 * CENT, 2 * CENT), (3 * CENT, 2 * CENT),
                                                      (4 * CENT, 3 * CENT)]
    assert sum(p.net for p in parts) == 10 * CENT and sum(p.tax_amount for p in parts) == 7 * CENT
    assert account.purchase_money(grant_id) == {"unit": USD, "net": 10 * CENT, "tax": 7 * CENT,
                                                "refunded_net": 10 * CENT, "refunded_tax": 7 * CENT}
    with pytest.raises(RefundExceedsGrant):
        refund(account, grant_id, 1, finance_override=True)

    account = new_account()
    grant_id = buy_credits(account)
    account.collect_events()
    [_, quarter] = refund(account, grant_id, 250 * U)
    assert (quarter.amount, quarter.net, quarter.tax_amount) == (15 * U, 12_500_000_000, 2_500_000_000)
    # The tax asked for on top is checked against the grant's own (CREDIT) tax: none was collected there.
    with pytest.raises(RefundExceedsGrant, match="tax"):
        refund(account, grant_id, 250 * U, tax_amount=1)
    assert account.pending_events == []


def test_a_tiny_refund_that_rounds_to_no_money_records_only_the_credit_side() -> None:
    account = new_account()
    grant_id = buy_credits(account, credits=1000 * U, net=5, tax=1)
    account.collect_events()
    assert names(refund(account, grant_id, 1)) == ["GrantRefunded"]
    assert account.purchase_money(grant_id)["refunded_net"] == 0  # type: ignore[index]


def test_a_finance_override_refund_of_spent_credit_reverses_the_money_too() -> None:
    account = new_account()
    grant_id = buy_credits(account)
    account.debit_usage(command_id=uuid4(), unit=CREDIT, amount=400 * U, meter="tokens", at=at(1),
                        overage_policy="overage", cause={})
    account.collect_events()
    with pytest.raises(LedgerError):
        refund(account, grant_id, 1000 * U)  # spent credit needs the override
    assert account.pending_events == []
    refunded = refund(account, grant_id, 1000 * U, finance_override=True)
    assert names(refunded) == ["GrantRefunded", "PurchaseMoneyRefunded"]
    assert account_balances(refunded[1].postings) == {(GC, USD): -60 * U, (DR, USD): 50 * U, (TAX, USD): 10 * U}


def test_a_credit_grant_recorded_before_the_booking_existed_refunds_in_its_unit_only() -> None:
    """Old streams: a credit-unit purchase without its money booked replays and refunds as before."""
    account = new_account()
    grant_id = ids.grant_id("acme", "old")
    account.grant_credit(grant_id=grant_id, unit=CREDIT, amount=1000 * U, effective_at=T0, expires_at=None,
                         scope=None, source="purchase", cause={"tax": "10.00", "total": "60.00"}, granted_by="test")
    account.collect_events()
    assert account.purchase_money(grant_id) is None
    assert names(refund(account, grant_id, 1000 * U)) == ["GrantRefunded"]


def test_booking_and_refunds_replay_to_the_same_account() -> None:
    account = BillingAccount.open("acme", USD, opened_by="admin@test")
    grant_id = buy_credits(account)
    account.refund_grant(grant_id=grant_id, amount=100 * U, refund_id=uuid4(), at=at(1), cause={})
    account.refund_grant(grant_id=grant_id, amount=900 * U, refund_id=uuid4(), at=at(2), cause={})
    events = account.collect_events()
    replayed: BillingAccount | None = None
    for event in events:
        replayed = event.mutate(replayed)
    assert replayed == account and replayed.purchase_money(grant_id) == account.purchase_money(grant_id)
    app: Application[UUID] = Application()
    app.save(*events)
    reloaded = app.repository.get(account.id)
    assert reloaded == account
    assert reloaded.purchase_money(grant_id) == {"unit": USD, "net": 50 * U, "tax": 10 * U,
                                                 "refunded_net": 50 * U, "refunded_tax": 10 * U}


# -- through the checkout commands ---------------------------------------------------------------------------


def apply(app: LedgerApplication, kind: str, payload: dict[str, Any], key: str) -> Any:
    [result] = app.apply_commands([command(kind, TENANT, payload, key)])
    assert result.outcome == "applied", result
    return result.value


def account_events(app: LedgerApplication) -> list[Any]:
    return list(app.events.get(ids.account_id(TENANT)))


def test_paying_a_credit_package_books_the_vat_in_the_currency_and_a_refund_reverses_it(
        ledger: LedgerApplication) -> None:
    placed = apply(ledger, "checkout.place", {"package": "credits-10k", "key": "o1", "gateway": "stripe"}, "o1/place")
    quote = placed["quote"]  # 95.00 + 19 % DE VAT = 113.05 USD for 10 000 + 1 000 CREDIT
    assert (quote["unit"], quote["currency"], quote["net"], quote["tax"], quote["total"]) == (
        CREDIT, USD, "95.00", "18.05", "113.05")
    paid = {"key": "o1", "gateway": "stripe", "payment_id": "pi_o1", "amount": quote["total"], "currency": USD}
    apply(ledger, "order.paid_off_session", paid, "o1/paid")
    # The same payment again changes nothing: the money is booked once.
    again = apply(ledger, "order.paid_off_session", paid, "o1/paid-again")
    assert again["already_paid"]
    events = account_events(ledger)
    [money] = [e for e in events if type(e).__name__ == "PurchaseMoneyBooked"]
    assert (money.unit, money.amount, money.net, money.tax_amount) == (USD, 11305 * 10**7, 9500 * 10**7, 1805 * 10**7)
    assert money.cause["order_id"] == placed["order_id"] and money.cause["payment_id"] == "pi_o1"
    assert booked(events)[(TAX, USD)] == -1805 * 10**7 and booked(events)[(GC, USD)] == 11305 * 10**7
    grant = ids.grant_id(TENANT, f"order/{placed['order_id']}/purchase")
    assert str(money.grant_id) == str(grant)

    apply(ledger, "refund_request.create", {"key": "r1", "order": "o1"}, "r1/create")
    apply(ledger, "refund_request.approve", {"key": "r1"}, "r1/approve")
    apply(ledger, "refund_request.complete", {"key": "r1", "gateway_refund": "re_1"}, "r1/complete")
    events = account_events(ledger)
    [back] = [e for e in events if type(e).__name__ == "PurchaseMoneyRefunded"]
    assert (back.unit, back.amount, back.net, back.tax_amount) == (USD, 11305 * 10**7, 9500 * 10**7, 1805 * 10**7)
    assert back.cause["gateway_refund"] == "re_1"
    assert booked(events) == {}  # money, tax and credit all reversed: every ledger account back at zero
    money_state = ledger.read(ids.account_id(TENANT), lambda a: a.purchase_money(grant))
    assert money_state == {"unit": USD, "net": 9500 * 10**7, "tax": 1805 * 10**7, "refunded_net": 9500 * 10**7,
                           "refunded_tax": 1805 * 10**7}

    # The hash chain covers the new events; the export replays; the domain replays to the same balances.
    assert verify_store(ledger, TENANT).ok
    replayed = replay_lines(list(export_lines(ledger, TENANT)))
    assert replayed.problems == []
