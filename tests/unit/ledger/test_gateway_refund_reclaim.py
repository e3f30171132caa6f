"""A gateway refund of a grant whose usage a give-back returned as ``usage_reversal`` credit (``GrantRefunded.reclaimed``).

The money has left at the gateway, so the refund is recorded in full and the credit given for the grant's usage is
taken back: from the wallet as far as it is unspent, the spent rest owed (receivables). Over any sequence of partial
refunds, give-backs, spending and expiries:

* what each refund pays back at the gateway is its paid part (wallet, breakage, adjustment, revenue) plus what it
  takes back (from the wallet, owed);
* no ``usage_reversal`` credit is taken back twice: each credit gives up, for each grant it reversed, at most what it
  reversed of it; in all exactly what was reversed once every grant is refunded in full;
* breakage is reversed once, never below zero;
* once every grant is refunded in full, no credit given for their usage is left in the wallet, and what is owed is
  the usage posted since, net of its give-backs.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.postings import LedgerAccount, account_balances, assert_balanced
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

U = SUBUNITS_PER_UNIT
T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
USD = "USD"
WALLET, RECEIVABLES, REVENUE, BREAKAGE, CLEARING = (
    LedgerAccount.TENANT_WALLET.value, LedgerAccount.RECEIVABLES.value, LedgerAccount.RECOGNISED_REVENUE.value,
    LedgerAccount.BREAKAGE.value, LedgerAccount.GATEWAY_CLEARING.value)


def at(minutes: int = 0, *, days: int = 0) -> datetime:
    return T0 + timedelta(minutes=minutes, days=days)


class Books:
    """An account with every event it recorded (so replay and the ledger's balances can be checked)."""

    def __init__(self, unit: str = USD) -> None:
        self.account = BillingAccount.open("acme", USD, opened_by="admin@test")
        self.unit = unit
        self.recorded: list[Any] = []
        self.clock = 0
        self.lapsed = False  # the grants' expiry swept: the steps after it come two days later
        self._take()

    def _take(self) -> list[Any]:
        new = list(self.account.collect_events())
        for event in new:
            assert_balanced(list(getattr(event, "postings", [])))
        self.recorded += new
        return new

    def now(self) -> datetime:
        self.clock += 1
        return at(self.clock, days=2 if self.lapsed else 0)

    def buy(self, key: str, amount: int, *, expires_at: datetime) -> UUID:
        grant_id = ids.grant_id("acme", key)
        self.account.grant_credit(grant_id=grant_id, unit=self.unit, amount=amount, priority=0, effective_at=T0,
                                  expires_at=expires_at, scope=None, source="purchase",
                                  cause={"gateway": "stripe", "order_id": key}, granted_by="test")
        self._take()
        return grant_id

    def use(self, amount: int, when: datetime) -> list[Any]:
        self.account.debit_usage(command_id=uuid4(), unit=self.unit, amount=amount, meter="tokens", at=when,
                                 overage_policy="overage", cause={})
        return self._take()

    def expire(self, when: datetime) -> None:
        self.lapsed = True
        self.account.expire_grants(when)
        self._take()

    def refund(self, grant_id: UUID, amount: int, when: datetime) -> Any:
        """The gateway's refund (``payment.refunded``): recorded in full, usage_reversal credit taken back."""
        self.account.refund_grant(grant_id=grant_id, amount=amount, refund_id=uuid4(), at=when,
                                  finance_override=True, reclaim_reversed=True, cause={"forced_by": "gateway"})
        [refund] = [e for e in self._take() if type(e).__name__ == "GrantRefunded"]
        return refund

    def adjust(self, amount: int, when: datetime) -> None:
        self.account.adjust(adjustment_id=uuid4(), unit=self.unit, amount=amount, reason="correction",
                            user="finance@test", at=when)
        self._take()

    def left_to_refund(self, key: str) -> int:
        """What the gateway may still refund of grant ``key`` (as ``payment.refunded`` finds it)."""
        [grant] = self.account.grants_caused_by(order_id=key)
        return int(grant["refundable"] + grant["reversed"])

    def ledger(self) -> dict[tuple[str, str], int]:
        lines = [line for e in self.recorded for line in getattr(e, "postings", [])]
        return {k: v for k, v in account_balances(lines).items() if v}

    def available(self) -> int:
        return int(self.account.available(self.unit))

    def owed(self) -> int:
        return int(self.account.overage_receivable(self.unit))

    def replayed(self) -> BillingAccount:
        replayed = None
        for event in self.recorded:
            replayed = event.mutate(replayed)
        assert isinstance(replayed, BillingAccount)
        return replayed

    def reversal_credits(self) -> dict[str, dict[str, int]]:
        """Each usage_reversal credit: what it reversed of each grant's usage (``reverses``)."""
        parts: dict[str, dict[str, int]] = {}
        for event in self.recorded:
            credit = getattr(event, "credit_grant", None)
            if credit and credit.get("reverses"):
                parts[credit["grant_id"]] = defaultdict(int)
                for part in credit["reverses"]:
                    parts[credit["grant_id"]][part["grant_id"]] += part["amount"]
        return parts

    def taken_back(self) -> dict[tuple[str, str], int]:
        """(credit, grant): what the gateway refunds of the grant took back of the credit (from the wallet or owed)."""
        taken: dict[tuple[str, str], int] = defaultdict(int)
        for event in self.recorded:
            reclaimed = getattr(event, "reclaimed", None) if type(event).__name__ == "GrantRefunded" else None
            parts = [part for name in ("draws", "adjusted", "owed") for part in (reclaimed or {}).get(name, [])]
            for part in parts:
                taken[(part["grant_id"], str(event.grant_id))] += part["amount"]
        return taken


def _two_lapsed_grants_given_back() -> tuple[Books, UUID, UUID]:
    """g1 and g2, 100.00 each, both used up and expired; then 30.00 of g1's usage given back (credit r1), then 90.00
    more (credit r2: the rest of g1's, 70.00, and 20.00 of g2's)."""
    books = Books()
    g1 = books.buy("g1", 100 * U, expires_at=at(days=2))
    g2 = books.buy("g2", 100 * U, expires_at=at(days=1))
    books.use(100 * U, at(1))  # drawn from g2, which ends first
    books.use(100 * U, at(2))  # g1
    books.expire(at(days=2))
    books.use(-30 * U, books.now())
    books.use(-90 * U, books.now())
    assert books.available() == 120 * U
    parts = sorted((sorted(p.items())) for p in books.reversal_credits().values())
    assert parts == sorted([[(str(g1), 30 * U)], sorted([(str(g1), 70 * U), (str(g2), 20 * U)])])
    return books, g1, g2


def test_partial_gateway_refunds_take_each_usage_reversal_credit_back_once() -> None:
    # g1 refunded at the gateway in two halves took 90.00 from r2, which reversed only 70.00 of g1 (the other 20.00
    # is g2's usage), and 10.00 from r1; g2's refund then found r2 empty and left 20.00 owed, while r1 kept 20.00 of
    # g1's credit: the customer owed 20.00 for credit they still held.
    books, g1, g2 = _two_lapsed_grants_given_back()
    first, second = books.refund(g1, 50 * U, books.now()), books.refund(g1, 50 * U, books.now())
    assert first.reclaimed["amount"] + second.reclaimed["amount"] == 100 * U
    full = books.refund(g2, 100 * U, books.now())
    assert full.reclaimed["amount"] == 20 * U and full.from_revenue == 80 * U
    # 200.00 paid, 200.00 back at the gateway; the 120.00 of credit given for the usage all taken back.
    assert books.available() == 0 and books.owed() == 0
    assert books.ledger() == {}
    for (credit, grant), taken in books.taken_back().items():
        assert taken <= books.reversal_credits()[credit][grant]
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()
    assert replayed.available(USD) == 0 and replayed.overage_receivable(USD) == 0


def test_partial_gateway_refunds_after_spending_owe_only_what_was_spent() -> None:
    books, g1, g2 = _two_lapsed_grants_given_back()
    books.use(50 * U, books.now())  # 50.00 of the 120.00 of credit spent
    books.refund(g1, 60 * U, books.now())
    books.refund(g2, 40 * U, books.now())
    books.refund(g1, 40 * U, books.now())
    books.refund(g2, 60 * U, books.now())
    assert books.available() == 0 and books.owed() == 50 * U
    assert books.ledger() == {(RECEIVABLES, USD): 50 * U, (REVENUE, USD): -50 * U}
    assert sum(books.taken_back().values()) == 120 * U


# -- sequences ---------------------------------------------------------------------------------------------------

# A step: ("use", amount) spends (or, negative, gives back) usage; ("refund", grant index, share of what is left to
# refund, 1..4 quarters); ("expire",) lapses both grants (once, at the first time it comes up); ("adjust", share)
# removes that many quarters of the available credit by a negative manual adjustment.
steps = st.lists(st.one_of(
    st.tuples(st.just("use"), st.integers(-80, 80).filter(bool)),
    st.tuples(st.just("adjust"), st.integers(1, 4)),
    st.tuples(st.just("refund"), st.integers(0, 1), st.integers(1, 4)),
    st.tuples(st.just("expire")),
), min_size=1, max_size=12)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, used=st.tuples(st.integers(0, 100), st.integers(0, 100)), split=st.integers(0, 4))
def test_any_sequence_of_partial_gateway_refunds_takes_back_what_was_reversed_once(
        steps: list[tuple[Any, ...]], used: tuple[int, int], split: int) -> None:
    books = Books()
    keys = ("g1", "g2")
    grants = [str(books.buy("g1", 100 * U, expires_at=at(days=2))), str(books.buy("g2", 100 * U, expires_at=at(days=1)))]
    books.use(used[0] * U, at(1))
    books.use(used[1] * U, at(2))
    net_usage = (used[0] + used[1]) * U  # usage rating may still give back (never more than it posted)
    expired = False
    paid_back = [0, 0]
    for step in steps + [("expire",), ("refund", 0, 4), ("refund", 1, 4)]:
        when = books.now()
        if step[0] == "expire" and not expired:
            books.expire(at(days=2))
            expired = True
        elif step[0] == "use":
            amount = max(step[1] * U, -net_usage)
            if amount:
                books.use(amount, when)
                net_usage += amount
        elif step[0] == "adjust":
            amount = books.available() * step[1] // 4
            if amount > 0:
                books.adjust(-amount, when)
        elif step[0] == "refund":
            amount = books.left_to_refund(keys[step[1]]) * step[2] // 4
            if amount:
                refund = books.refund(UUID(grants[step[1]]), amount, when)
                paid_back[step[1]] += amount
                reclaimed = refund.reclaimed or {"amount": 0, "draws": [], "receivable": 0}
                # The money refunded is its paid part plus what it took back of usage_reversal credit.
                paid = refund.from_wallet + refund.from_breakage + refund.from_adjustment + refund.from_revenue
                assert refund.amount == paid + reclaimed["amount"]
                assert reclaimed["amount"] == (sum(d["amount"] for d in reclaimed["draws"]) + reclaimed["receivable"]
                                               + reclaimed.get("from_adjustment", 0))
        # Never a credit taken back beyond what it reversed of a grant; breakage never reversed below zero.
        reversals = books.reversal_credits()
        for (credit, grant_id), taken in books.taken_back().items():
            assert taken <= reversals[credit][grant_id], (credit, grant_id)
        assert books.ledger().get((BREAKAGE, USD), 0) <= 0
    assert paid_back == [100 * U, 100 * U]
    ledger = books.ledger()
    assert ledger.get((CLEARING, USD), 0) == 0 and ledger.get((BREAKAGE, USD), 0) == 0
    # Every credit given for the grants' usage taken back, each part exactly once.
    taken = books.taken_back()
    for credit, parts in books.reversal_credits().items():
        for grant_id, amount in parts.items():
            assert taken[(credit, grant_id)] == amount, (credit, grant_id)
    # The refunds paid back from revenue exactly the grants' usage not given back as credit (drawn, less what
    # give-backs credited them again or reversed as usage_reversal credit): the customer keeps no usage twice.
    refunds = [e for e in books.recorded if type(e).__name__ == "GrantRefunded"]
    used_of_grants = 0
    for event in books.recorded:
        if type(event).__name__ == "UsageDebited":
            used_of_grants += sum(d["amount"] for d in event.draws if d["grant_id"] in grants)
            used_of_grants -= sum(p["amount"] for p in (event.credit_grant or {}).get("reverses") or ()
                                  if p["grant_id"] in grants)
    assert sum(r.from_revenue for r in refunds) == used_of_grants
    assert ledger.get((WALLET, USD), 0) == -books.available()
    assert ledger.get((RECEIVABLES, USD), 0) == books.owed()
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()
    assert replayed.overage_receivable(USD) == books.owed()
    # Then the rest of the usage given back (in two parts, ``split`` quarters first): the grants' money all went back
    # at the gateway and no usage is left, so nothing is left either: no credit, nothing owed, no revenue (a give-back
    # of usage whose credit a refund made owed clears it once and never credits it again).
    first = net_usage * split // 4
    for amount in (first, net_usage - first):
        if amount:
            books.use(-amount, books.now())
    assert books.available() == 0 and books.owed() == 0
    assert books.ledger() == {}
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()


# -- a give-back of usage whose credit a gateway refund made owed --------------------------------------------------

def _refunded_with_spent_credit_owed() -> tuple[Books, UUID]:
    """g (100.00) bought, used up, expired; 60.00 of its usage given back (credit r); 25.00 of r spent; then the
    gateway refunds g in full: 40.00 from revenue, 35.00 of r taken back from the wallet, 25.00 owed."""
    books = Books()
    g = books.buy("g", 100 * U, expires_at=at(days=1))
    books.use(100 * U, at(1))
    books.expire(at(days=2))
    books.use(-60 * U, books.now())
    books.use(25 * U, books.now())  # drawn from r
    refund = books.refund(g, 100 * U, books.now())
    assert refund.from_revenue == 40 * U and refund.reclaimed["receivable"] == 25 * U
    assert books.available() == 0 and books.owed() == 25 * U
    return books, g


def _clears_what_is_owed_then_absorbs(books: Books, *, owed: int, rest: int) -> None:
    """The give-back of the usage whose credit is ``owed`` clears it; the give-back of the refunded grant's
    ``rest`` after it is absorbed whole (no credit, no postings); the books end at nothing, and a replay agrees."""
    books.use(-owed, books.now())
    assert books.available() == 0 and books.owed() == 0
    [last] = [e for e in books.use(-rest, books.now()) if type(e).__name__ == "UsageDebited"]
    assert sum(part["amount"] for part in last.absorbed or ()) == rest and not last.postings
    assert books.available() == 0 and books.owed() == 0
    assert books.ledger() == {}
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()
    assert replayed.available(USD) == 0 and replayed.overage_receivable(USD) == 0


def test_a_give_back_of_usage_whose_credit_was_owed_clears_it_once_and_never_credits_it_again() -> None:
    # The give-back of the 25.00 cleared what was owed, but the draw of r stayed remembered: the give-back of g's
    # last 40.00 of usage then credited r 25.00 again (the customer got credit for usage they no longer owed for),
    # where all 40.00 is absorbed (g's money went back to the customer at the gateway).
    books, _ = _refunded_with_spent_credit_owed()
    # 100.00 paid and 100.00 back at the gateway, the usage all given back: nothing left anywhere.
    _clears_what_is_owed_then_absorbs(books, owed=25 * U, rest=40 * U)


def test_a_give_back_in_the_other_order_after_the_owed_part_clears_it_once() -> None:
    # g's 40.00 given back first clears the 25.00 owed and absorbs the other 15.00; the 25.00 after it is absorbed
    # too (it used to credit r 15.00 and then 10.00 more).
    books, _ = _refunded_with_spent_credit_owed()
    books.use(-40 * U, books.now())
    books.use(-25 * U, books.now())
    assert books.available() == 0 and books.owed() == 0
    assert books.ledger() == {}


def test_a_give_back_after_the_owed_part_was_invoiced_is_credited_as_the_invoice_bills_it() -> None:
    # Billed by an invoice (collected in full), the usage given back becomes credit once: 25.00, not 50.00.
    books, _ = _refunded_with_spent_credit_owed()
    taken = books.account.invoice_overage(invoice="inv-1", units=[USD], end=at(days=30), at=at(days=3))
    assert sum(taken[USD].values()) == 25 * U
    books._take()
    books.use(-25 * U, books.now())
    books.use(-40 * U, books.now())
    assert books.available() == 25 * U and books.owed() == 25 * U  # the invoice's 25.00, paid or not
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()


def test_a_give_back_after_credit_bought_repaid_the_owed_part_credits_it_back_once() -> None:
    # 25.00 bought repays what is owed (its draw remembered); the give-backs then give that 25.00 back once.
    books, _ = _refunded_with_spent_credit_owed()
    n = books.buy("n", 25 * U, expires_at=at(days=90))
    assert books.account.repay_overage(grant_id=n, at=books.now(), cause={}) == 25 * U
    books._take()
    assert books.owed() == 0 and books.available() == 0
    books.use(-25 * U, books.now())
    books.use(-40 * U, books.now())
    assert books.available() == 25 * U and books.owed() == 0
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()


def test_a_give_back_after_the_invoice_billing_the_owed_part_is_paid_or_voided() -> None:
    # Paid: the customer paid the 25.00 and gets it back as credit once. Voided unpaid: owed again, unbilled, so the
    # give-back clears it and nothing comes back.
    for paid in (True, False):
        books, _ = _refunded_with_spent_credit_owed()
        books.account.invoice_overage(invoice="inv-1", units=[USD], end=at(days=30), at=at(days=3))
        if paid:
            books.account.settle_invoiced_overage(invoice="inv-1", at=at(days=4), cause={})
        else:
            books.account.return_invoiced_overage(invoice="inv-1", at=at(days=4))
        books._take()
        books.use(-25 * U, books.now())
        books.use(-40 * U, books.now())
        assert (books.available(), books.owed()) == ((25 * U, 0) if paid else (0, 0)), paid
        if not paid:
            assert books.ledger() == {}
        replayed = books.replayed()
        assert replayed.grant_balances() == books.account.grant_balances()


# -- an invoice refund that made a credit note's spent credit owed -------------------------------------------------

def _invoice_refund_with_spent_credit_note_owed() -> tuple[Books, UUID]:
    """g (100.00) bought and used up, then refunded at the gateway in full (from revenue: its usage is paid back in
    money, so a give-back of it is absorbed). An invoice of 30.00, paid; a credit note gives its 30.00 back as account
    credit (c, for unused time), and usage spends it; then the gateway refunds the invoice's 30.00 too: the note's
    credit is taken back, and as it was spent, 30.00 is owed."""
    books = Books()
    g = books.buy("g", 100 * U, expires_at=at(days=90))
    books.use(100 * U, books.now())
    books.refund(g, 100 * U, books.now())
    account = books.account
    account.bill_invoice(invoice="inv-1", unit=USD, net=30 * U, tax=0, at=books.now(), cause={})
    account.settle_invoiced_overage(invoice="inv-1", at=books.now(), cause={})
    note = uuid4()
    account.credit_note_grant(grant_id=note, note="cn-1", unit=USD, net=30 * U, tax=0, at=books.now(), cause={})
    books._take()
    books.use(30 * U, books.now())  # drawn from the note's credit
    account.refund_invoice_payment(note="re-1", unit=USD, amount=30 * U, tax=0, at=books.now(), cause={},
                                   excess=30 * U, reclaim=[str(note)])
    books._take()
    assert books.available() == 0 and books.owed() == 30 * U
    return books, note


def test_a_give_back_after_an_invoice_refund_made_a_credit_note_s_spent_credit_owed_credits_it_once() -> None:
    # The give-back of the 30.00 that spent the note's credit cleared what was owed, but that usage's draw of the
    # note stayed remembered: the give-back of g's 100.00 of usage (its money already back at the gateway) then
    # credited the note 30.00 again, where all of it is absorbed. The customer kept 30.00 of credit for an invoice
    # whose money the gateway gave back.
    books, _ = _invoice_refund_with_spent_credit_note_owed()
    # 130.00 paid, 130.00 back at the gateway, the usage all given back: nothing left anywhere.
    _clears_what_is_owed_then_absorbs(books, owed=30 * U, rest=100 * U)


def test_a_give_back_after_an_invoice_refund_in_the_other_order_clears_what_is_owed_once() -> None:
    # g's 100.00 first: 30.00 clears what is owed, 70.00 absorbed; the 30.00 after it is absorbed too (the note's
    # credit is gone with the invoice's money).
    books, _ = _invoice_refund_with_spent_credit_note_owed()
    books.use(-100 * U, books.now())
    books.use(-30 * U, books.now())
    assert books.available() == 0 and books.owed() == 0
    assert books.ledger() == {}


def test_a_give_back_after_the_invoice_refund_s_owed_part_was_invoiced_and_paid_credits_the_note_once() -> None:
    # Billed and paid, the 30.00 is the customer's again: a give-back of the usage credits the note's credit back once.
    books, _ = _invoice_refund_with_spent_credit_note_owed()
    books.account.invoice_overage(invoice="inv-2", units=[USD], end=at(days=30), at=books.now())
    books.account.settle_invoiced_overage(invoice="inv-2", at=books.now(), cause={})
    books._take()
    books.use(-30 * U, books.now())
    books.use(-100 * U, books.now())
    assert books.available() == 30 * U and books.owed() == 0
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()


# -- a gateway refund after a negative adjustment removed usage_reversal credit ------------------------------------

def test_a_gateway_refund_takes_usage_reversal_credit_an_adjustment_removed_from_manual_adjustment_not_owed() -> None:
    # g (100.00) bought, used, expired; 60.00 of its usage given back (credit r); a negative adjustment removes 20.00
    # of r; then the gateway refunds g in full. The refund took 40.00 of r back from the wallet and left 20.00 owed,
    # as if spent: the customer was charged again for credit the adjustment had already taken away. That 20.00 comes
    # back out of manual_adjustment (the adjustment's removal no longer stands: the money went back at the gateway),
    # as an override refund's ``from_adjustment`` does; nothing is owed.
    books = Books()
    g = books.buy("g", 100 * U, expires_at=at(days=1))
    books.use(100 * U, at(1))
    books.expire(at(days=2))
    books.use(-60 * U, books.now())
    books.account.adjust(adjustment_id=uuid4(), unit=USD, amount=-20 * U, reason="goodwill clawback",
                         user="finance@test", at=books.now())
    books._take()
    assert books.available() == 40 * U
    refund = books.refund(g, 100 * U, books.now())
    assert refund.from_revenue == 40 * U and refund.reclaimed["amount"] == 60 * U
    assert refund.reclaimed["receivable"] == 0 and refund.reclaimed["from_adjustment"] == 20 * U
    assert books.available() == 0 and books.owed() == 0
    # 100.00 paid, 100.00 back at the gateway: nothing left, the adjustment's 20.00 included.
    assert books.ledger() == {}
    replayed = books.replayed()
    assert replayed.grant_balances() == books.account.grant_balances()
    assert replayed.available(USD) == 0 and replayed.overage_receivable(USD) == 0
