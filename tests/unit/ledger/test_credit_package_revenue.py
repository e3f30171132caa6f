"""The money of credit packages granted in a credit unit is recognised as revenue as the credit is used.

``book_purchase_money`` books the net price to ``deferred_revenue`` in the currency; ``recognise_purchase_money``
(periodic, run by the sweeper, never by a usage debit) moves it to ``recognised_revenue`` as the credit is
consumed and to ``breakage`` as it lapses, exactly (cumulative floor), so that a grant with no credit left has
exactly nothing deferred; refunds pay back from what is still deferred, or from revenue and breakage already
recognised for the credit refunded. Through the domain and through the ``money.recognise`` command.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.domain.account import MONEY_RECOGNITION_INTERVAL, BillingAccount
from billing_ledger.domain.postings import LedgerAccount, account_balances, assert_balanced
from eventsourcing.application import Application

U = SUBUNITS_PER_UNIT
CENT = U // 100  # refunds pay back money floored to the cent: the money of refund tests is in cents
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
USD, CREDIT = "USD", "CREDIT"
GC, DR, RR, BRK, TAX, WALLET = (LedgerAccount.GATEWAY_CLEARING.value, LedgerAccount.DEFERRED_REVENUE.value,
                                LedgerAccount.RECOGNISED_REVENUE.value, LedgerAccount.BREAKAGE.value,
                                LedgerAccount.TAX_PAYABLE.value, LedgerAccount.TENANT_WALLET.value)


def at(minutes: int = 0) -> datetime:
    return T0 + timedelta(minutes=minutes)


class Books:
    """An account and every event it recorded, so the ledger accounts can be summed at any point."""

    def __init__(self) -> None:
        self.account = BillingAccount.open("acme", USD, opened_by="admin@test")
        self.events: list[Any] = list(self.account.collect_events())

    def collect(self) -> list[Any]:
        new = self.account.collect_events()
        self.events += new
        return new  # type: ignore[no-any-return]

    def buy(self, key: str = "p1", credits: int = 11_000, net: int = 9500 * U // 100, tax: int = 1805 * U // 100,
            expires_at: datetime | None = None) -> UUID:
        """A package of ``credits`` CREDIT (scale 0 here: sub-units are whole credits) for ``net`` + ``tax``."""
        grant_id = ids.grant_id("acme", key)
        self.account.grant_credit(grant_id=grant_id, unit=CREDIT, amount=credits, effective_at=T0,
                                  expires_at=expires_at, scope=None, source="purchase", cause={"order_id": key},
                                  granted_by="test")
        self.account.book_purchase_money(grant_id=grant_id, currency=USD, net=net, tax_amount=tax, at=T0,
                                         cause={"order_id": key})
        self.collect()
        return grant_id

    def use(self, amount: int, minutes: int = 1) -> None:
        self.account.debit_usage(command_id=uuid4(), unit=CREDIT, amount=amount, meter="tokens", at=at(minutes),
                                 overage_policy="overage", cause={})
        self.collect()

    def recognise(self, minutes: int = 2) -> list[Any]:
        self.account.recognise_purchase_money(at(minutes))
        return self.collect()

    def refund(self, grant_id: UUID, amount: int, **kwargs: Any) -> list[Any]:
        self.account.refund_grant(grant_id=grant_id, amount=amount, refund_id=uuid4(), at=at(30), cause={},
                                  **kwargs)
        return self.collect()

    def usd(self, grant_id: UUID | None = None) -> dict[str, int]:
        """The USD ledger accounts (of one grant), credit-positive for the liability and revenue ones."""
        lines = [line for e in self.events for line in getattr(e, "postings", [])
                 if line["unit"] == USD and (grant_id is None or line["grant_id"] == str(grant_id))]
        return {account: -amount for (account, _), amount in account_balances(lines).items() if amount}

    def revenue(self, grant_id: UUID) -> dict[str, int]:
        found = self.account.purchase_revenue(grant_id)
        assert found is not None
        parts = {k: found[k] for k in ("deferred", "recognised", "breakage", "refunded_net")}
        assert min(parts.values()) >= 0 and sum(parts.values()) == found["net"], found
        # What the grant's state says is what its postings say.
        books = self.usd(grant_id)
        assert (books.get(DR, 0), books.get(RR, 0), books.get(BRK, 0)) == (
            parts["deferred"], parts["recognised"], parts["breakage"])
        return parts


def names(events: list[Any]) -> list[str]:
    return [type(e).__name__ for e in events]


def test_usage_debits_record_nothing_in_the_currency_and_recognition_is_exact_by_floor() -> None:
    books = Books()
    # 3 credits for 10 sub-units: thirds do not divide.
    grant_id = books.buy(credits=3, net=10, tax=2)
    books.use(1)
    [debit] = [e for e in books.events if type(e).__name__ == "UsageDebited"]
    assert {line["unit"] for line in debit.postings} == {CREDIT}  # the hot path is untouched
    assert books.revenue(grant_id)["deferred"] == 10
    assert books.account.purchase_money_due(at(2))  # never recognised before: due at once
    [recognised] = books.recognise()
    assert names([recognised]) == ["PurchaseMoneyRecognised"]
    assert_balanced(recognised.postings)
    assert (recognised.unit, recognised.recognised, recognised.breakage) == (USD, 3, 0)
    assert recognised.grants == [{"grant_id": str(grant_id), "recognised": 3, "breakage": 0}]
    assert account_balances(recognised.postings) == {(DR, USD): 3, (RR, USD): -3}
    assert books.revenue(grant_id) == {"deferred": 7, "recognised": 3, "breakage": 0, "refunded_net": 0}
    books.use(1)
    books.recognise(3)
    assert books.revenue(grant_id)["recognised"] == 6  # floor(10 * 2 / 3)
    books.use(1)
    books.recognise(4)
    # All consumed: exactly the net recognised, nothing deferred.
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 10, "breakage": 0, "refunded_net": 0}
    assert books.usd() == {GC: -12, RR: 10, TAX: 2}


def test_a_package_used_up_closes_its_deferred_revenue_to_exactly_zero() -> None:
    books = Books()
    grant_id = books.buy()  # 11,000 CREDIT for USD 95.00 + 18.05 VAT
    for n, amount in enumerate((1234, 4321, 77, 3333)):
        books.use(amount, minutes=n)
        books.recognise(n)
        consumed = sum((1234, 4321, 77, 3333)[:n + 1])
        assert books.revenue(grant_id)["recognised"] == 9500 * U // 100 * consumed // 11_000
    books.use(11_000 - 8965 + 5, minutes=10)  # the rest and 5 beyond the credit (overage, not this grant's)
    assert books.account.purchase_money_due(at(10))  # finished: due at once, not in an hour
    books.recognise(11)
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 9500 * U // 100, "breakage": 0,
                                       "refunded_net": 0}


def test_expiry_sends_the_unused_share_to_breakage() -> None:
    books = Books()
    grant_id = books.buy(credits=7, net=100, tax=0, expires_at=at(60))
    books.use(3)
    books.recognise()
    assert books.revenue(grant_id) == {"deferred": 58, "recognised": 42, "breakage": 0, "refunded_net": 0}
    assert not books.account.purchase_money_due(at(59))
    assert books.account.purchase_money_due(at(60))  # the grant expires: due with it
    books.account.expire_grants(at(60))
    books.collect()
    [recognised] = books.recognise(60)
    assert (recognised.recognised, recognised.breakage) == (0, 58)
    assert account_balances(recognised.postings) == {(DR, USD): 58, (BRK, USD): -58}
    # floor(100 * 3 / 7) = 42 recognised, floor(100 * 7 / 7) - 42 = 58 to breakage, nothing deferred.
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 42, "breakage": 58, "refunded_net": 0}


def test_running_recognition_again_changes_nothing() -> None:
    books = Books()
    grant_id = books.buy(credits=1000, net=999)
    books.use(333)
    assert len(books.recognise()) == 1
    before = books.revenue(grant_id)
    assert books.recognise(3) == [] and books.recognise(500) == []
    assert books.revenue(grant_id) == before
    assert not books.account.purchase_money_due(at(3)) and not books.account.purchase_money_due(at(500))


def test_a_refund_of_unspent_credit_after_partial_recognition_pays_back_from_deferred_revenue() -> None:
    books = Books()
    grant_id = books.buy(credits=3, net=10 * CENT, tax=3 * CENT)
    books.use(1)
    books.recognise()
    third = 10 * CENT // 3  # recognised to the sub-unit
    assert books.revenue(grant_id) == {"deferred": 10 * CENT - third, "recognised": third, "breakage": 0,
                                       "refunded_net": 0}
    refunded = books.refund(grant_id, 2)  # the unspent rest
    assert names(refunded) == ["GrantRefunded", "PurchaseMoneyRefunded"]
    # Two thirds of the money floored to the cent: 0.06 + 0.02 VAT (never 0.0666666666).
    assert account_balances(refunded[1].postings) == {(GC, USD): -8 * CENT, (DR, USD): 6 * CENT,
                                                      (TAX, USD): 2 * CENT}
    # Nothing of the grant is deferred any more; the rest of the rounding goes to its revenue.
    assert books.revenue(grant_id) == {"deferred": 4 * CENT - third, "recognised": third, "breakage": 0,
                                       "refunded_net": 6 * CENT}
    assert books.account.purchase_money_due(at(31))
    books.recognise(31)
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 4 * CENT, "breakage": 0,
                                       "refunded_net": 6 * CENT}
    assert books.usd() == {GC: -5 * CENT, RR: 4 * CENT, TAX: 1 * CENT}  # paid 0.13, got 0.08 back


def test_a_finance_override_refund_of_recognised_credit_reverses_revenue_and_breakage() -> None:
    books = Books()
    grant_id = books.buy(credits=1000, net=500 * CENT, tax=100 * CENT, expires_at=at(60))
    books.use(400)
    books.recognise()
    books.account.expire_grants(at(60))
    books.collect()
    books.recognise(60)
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 200 * CENT, "breakage": 300 * CENT,
                                       "refunded_net": 0}
    # A quarter back: from the lapsed credit first (as the credit side does), from breakage.
    [credit_side, money_back] = books.refund(grant_id, 250, finance_override=True)
    assert (credit_side.from_breakage, credit_side.from_revenue) == (250, 0)
    assert account_balances(money_back.postings) == {(GC, USD): -150 * CENT, (BRK, USD): 125 * CENT,
                                                     (TAX, USD): 25 * CENT}
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 200 * CENT, "breakage": 175 * CENT,
                                       "refunded_net": 125 * CENT}
    # The rest: the lapsed part from breakage, the spent part from recognised revenue.
    [credit_side, money_back] = books.refund(grant_id, 750, finance_override=True)
    assert (credit_side.from_breakage, credit_side.from_revenue) == (350, 400)
    assert account_balances(money_back.postings) == {(GC, USD): -450 * CENT, (BRK, USD): 175 * CENT,
                                                     (RR, USD): 200 * CENT, (TAX, USD): 75 * CENT}
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 0, "breakage": 0, "refunded_net": 500 * CENT}
    assert books.recognise(61) == []
    # Every ledger account of both units is back at zero.
    lines = [line for e in books.events for line in getattr(e, "postings", [])]
    assert {k: v for k, v in account_balances(lines).items() if v} == {}


def test_an_override_refund_of_spent_credit_not_yet_recognised_comes_from_deferred_revenue() -> None:
    books = Books()
    grant_id = books.buy(credits=1000, net=500, tax=0)
    books.use(300)
    books.recognise()
    books.use(300, minutes=5)  # not recognised yet
    [_, money_back] = books.refund(grant_id, 1000, finance_override=True)
    # 150 was recognised for the first 300; the money of the rest was still deferred.
    assert account_balances(money_back.postings) == {(GC, USD): -500, (DR, USD): 350, (RR, USD): 150}
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 0, "breakage": 0, "refunded_net": 500}
    assert books.recognise(40) == []


def test_a_partial_override_refund_keeps_each_currency_account_of_the_grant_on_its_side() -> None:
    books = Books()
    grant_id = books.buy(credits=9, net=100 * CENT, tax=0)
    books.use(8)
    books.recognise()
    eight_ninths = 100 * CENT * 8 // 9  # recognised to the sub-unit
    assert books.revenue(grant_id) == {"deferred": 100 * CENT - eight_ninths, "recognised": eight_ninths,
                                       "breakage": 0, "refunded_net": 0}
    # 5 back: 1 from the wallet, 4 spent. 1.00 * 5 / 9 floored to the cent: 0.55 of money.
    [_, money_back] = books.refund(grant_id, 5, finance_override=True)
    # The 4 credits still consumed earn the rest, 0.45, now that nothing of the grant is deferred. So what was
    # recognised beyond 0.45 comes back from revenue, the rest of the 0.55 from deferred revenue.
    assert account_balances(money_back.postings) == {(GC, USD): -55 * CENT, (DR, USD): 100 * CENT - eight_ninths,
                                                     (RR, USD): eight_ninths - 45 * CENT}
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 45 * CENT, "breakage": 0,
                                       "refunded_net": 55 * CENT}
    assert books.recognise(31) == []


def test_a_give_back_reverses_recognised_revenue_and_a_negative_adjustment_lapses() -> None:
    books = Books()
    grant_id = books.buy(credits=100, net=1000, tax=0)
    books.use(50)
    books.recognise()
    books.use(-20, minutes=3)  # usage given back to the grant
    [reversal] = books.recognise(4)
    assert (reversal.recognised, reversal.breakage) == (-200, 0)
    assert account_balances(reversal.postings) == {(DR, USD): -200, (RR, USD): 200}
    assert books.revenue(grant_id) == {"deferred": 700, "recognised": 300, "breakage": 0, "refunded_net": 0}
    # Finance removes 10 credits: the tenant's right to them ended unused.
    books.account.adjust(adjustment_id=uuid4(), unit=CREDIT, amount=-10, reason="correction", user="finance",
                         at=at(5))
    books.collect()
    books.recognise(6)
    assert books.revenue(grant_id) == {"deferred": 600, "recognised": 300, "breakage": 100, "refunded_net": 0}


def test_an_override_refund_after_a_negative_adjustment_reverses_the_adjusted_credit_and_its_lapsed_money() -> None:
    books = Books()
    grant_id = books.buy(credits=100, net=1000, tax=0)
    books.use(30)
    books.account.adjust(adjustment_id=uuid4(), unit=CREDIT, amount=-40, reason="correction", user="finance",
                         at=at(5))
    books.collect()
    books.recognise(6)
    assert books.revenue(grant_id) == {"deferred": 300, "recognised": 300, "breakage": 400, "refunded_net": 0}
    [credit_side, money_back] = books.refund(grant_id, 100, finance_override=True)
    assert (credit_side.from_wallet, credit_side.from_adjustment, credit_side.from_revenue) == (30, 40, 30)
    # The money follows the credit: the adjusted credit's from breakage, the spent credit's from revenue.
    assert account_balances(money_back.postings) == {(GC, USD): -1000, (DR, USD): 300, (RR, USD): 300,
                                                     (BRK, USD): 400}
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 0, "breakage": 0, "refunded_net": 1000}
    # Every ledger account of both units is back at zero: no CREDIT revenue taken for the adjusted credit.
    assert credit_books(books) == {}
    assert books.usd() == {}
    assert books.recognise(40) == []


def credit_books(books: Books) -> dict[str, int]:
    """The CREDIT ledger accounts, debit positive (revenue below zero is earned)."""
    lines = [line for e in books.events for line in getattr(e, "postings", []) if line["unit"] == CREDIT]
    return {account: amount for (account, _), amount in account_balances(lines).items() if amount}


def test_a_give_back_after_an_override_refund_of_the_spent_credit_credits_only_what_was_not_paid_back() -> None:
    books = Books()
    grant_id = books.buy(credits=100, net=100 * CENT, tax=0)
    books.use(100)
    books.recognise()
    [credit_side, _] = books.refund(grant_id, 60, finance_override=True)  # 60 of the spent credit, 0.60 paid back
    assert credit_side.from_revenue == 60
    books.use(-100, minutes=40)  # the usage given back (a correction)
    [back] = [e for e in books.events if type(e).__name__ == "UsageDebited"][-1:]
    assert back.draws == [{"grant_id": str(grant_id), "amount": -40}]
    assert back.absorbed == [{"grant_id": str(grant_id), "amount": 60}]
    grant = next(g for g in books.account.grant_balances() if g["grant_id"] == str(grant_id))
    assert (grant["remaining"], grant["refunded"]) == (40, 60)
    # No CREDIT revenue is left for usage that did not happen, and none below zero.
    assert credit_books(books) == {GC: 40, WALLET: -40}
    books.recognise(41)
    assert books.revenue(grant_id) == {"deferred": 40 * CENT, "recognised": 0, "breakage": 0,
                                       "refunded_net": 60 * CENT}


def test_a_give_back_after_a_full_override_refund_leaves_nothing_to_spend() -> None:
    books = Books()
    grant_id = books.buy(credits=100, net=100 * CENT, tax=0)
    books.use(100)
    books.recognise()
    books.refund(grant_id, 100, finance_override=True)
    books.use(-100, minutes=40)
    assert books.account.available(CREDIT) == 0
    books.account.debit_usage(command_id=uuid4(), unit=CREDIT, amount=100, meter="tokens", at=at(41),
                              overage_policy="block", cause={})
    assert names(books.collect()) == ["UsageRejected"]
    assert credit_books(books) == {} and books.recognise(42) == []
    assert books.revenue(grant_id) == {"deferred": 0, "recognised": 0, "breakage": 0, "refunded_net": 100 * CENT}


def test_recognition_is_due_at_most_hourly_or_at_a_new_utc_day() -> None:
    books = Books()
    books.buy(credits=1000, net=1000, tax=0)
    assert not books.account.purchase_money_due(at(1))  # nothing used yet
    books.use(10)
    books.recognise(2)
    books.use(10, minutes=3)
    assert not books.account.purchase_money_due(at(30))
    assert books.account.purchase_money_due(at(2) + MONEY_RECOGNITION_INTERVAL)
    midnight = datetime(2026, 11, 2, tzinfo=UTC)
    late = Books()
    late.buy(credits=1000, net=1000, tax=0)
    late.use(10)
    late.account.recognise_purchase_money(midnight - timedelta(minutes=5))
    late.collect()
    late.account.debit_usage(command_id=uuid4(), unit=CREDIT, amount=5, meter="tokens",
                             at=midnight - timedelta(minutes=4), overage_policy="overage", cause={})
    late.collect()
    assert not late.account.purchase_money_due(midnight - timedelta(minutes=1))
    assert late.account.purchase_money_due(midnight + timedelta(seconds=5))  # the day closes with its revenue


def test_recognition_replays_to_the_same_account_and_currency_grants_are_untouched() -> None:
    books = Books()
    grant_id = books.buy(credits=1000, net=777 * CENT, tax=100 * CENT, expires_at=at(60))
    usd_grant = ids.grant_id("acme", "usd")
    books.account.grant_credit(grant_id=usd_grant, unit=USD, amount=50 * U, effective_at=T0, expires_at=None,
                               scope=None, source="purchase", cause={}, granted_by="test", tax_amount=10 * U)
    books.account.debit_usage(command_id=uuid4(), unit=USD, amount=20 * U, meter="tokens", at=at(1),
                              overage_policy="overage", cause={})
    books.collect()
    assert books.recognise() == []  # a currency grant recognises on use, as before: nothing to do
    books.use(123)
    books.recognise(3)
    books.refund(grant_id, 100)
    books.account.expire_grants(at(60))
    books.collect()
    books.recognise(61)
    assert books.revenue(grant_id)["deferred"] == 0
    replayed: BillingAccount | None = None
    for event in books.events:
        replayed = event.mutate(replayed)
    assert replayed == books.account
    assert replayed.purchase_revenue(grant_id) == books.account.purchase_revenue(grant_id)
    app: Application[UUID] = Application()
    app.save(*books.events)
    reloaded = app.repository.get(books.account.id)
    assert reloaded == books.account
    assert reloaded.purchase_revenue(grant_id) == books.account.purchase_revenue(grant_id)
    assert reloaded.purchase_money(grant_id) == {"unit": USD, "net": 777 * CENT, "tax": 100 * CENT,
                                                 "refunded_net": 77 * CENT, "refunded_tax": 10 * CENT}
