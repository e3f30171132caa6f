"""Properties of a renewal invoice's usage part (invoice_overage.overage_lines, hypothesis).

Rating's usage lines (exact amounts with up to 9 decimals, rounded once per line as the invoice rounds them), the
ended period's own overage and overage left from earlier periods (posted, and reduced by give-backs), in a
currency with 0, 2 or 3 minor digits:

* the credits applied are the credit drawn (the usage lines' exact total less the own overage they show), rounded
  once, never more than the usage lines bill; the usage part of the invoice (usage lines + credits applied +
  overage lines) is the overage taken to within the rounding of its lines, never negative, and no credits-applied
  line is positive nor an overage line negative;
* the overage the invoice takes leaves the account's unbilled overage and is kept on the invoice, with the rounding
  of its lines posted: what is receivable for it is exactly the usage part the invoice bills.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import uuid4

from billing_events.money import RATING_CONTEXT, currency, from_subunits, round_minor, to_subunits
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import INVOICE, Invoice, line
from billing_ledger.invoice_overage import overage_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PERIOD_START = datetime(2026, 10, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 11, 1, tzinfo=UTC)
AT = datetime(2026, 11, 1, 0, 5, tzinfo=UTC)
# Keys rating gives the ended period (its start, or its calendar month) and earlier ones.
OWN_KEYS = (PERIOD_START.isoformat(), "2026-10")
EARLIER_KEYS = ("2026-09", "2026-08-15T00:00:00+00:00")
USAGE_PART = frozenset({"usage", "credits_applied", "overage"})

# An exact rated amount: up to 9 decimals, up to 10,000 currency units.
exact_amounts = st.integers(0, 10_000 * 10**9).map(lambda n: Decimal(n).scaleb(-9))
# Usage posted beyond credit under a period, and give-backs (negative) under a period.
overage_posts = st.lists(st.tuples(st.sampled_from(OWN_KEYS + EARLIER_KEYS),
                                   st.one_of(st.integers(-2_000 * 10**9, 10_000 * 10**9),
                                             st.integers(-10**8, 10**8)).filter(bool)), max_size=6)


def draft(money: str, amounts: list[Decimal]) -> Invoice:
    usage = [line("usage", f"meter {n}", amount, money, quantity="1") for n, amount in enumerate(amounts)]
    return Invoice(tenant="prop", key=f"renewal-{uuid4()}", document_type=INVOICE, currency=money, lines=usage,
                   period_start=PERIOD_START, period_end=PERIOD_END, subscription_id="sub", related_invoice=None,
                   at=AT, by="hypothesis")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(money=st.sampled_from(("USD", "JPY", "KWD")), amounts=st.lists(exact_amounts, max_size=5),
       posts=overage_posts, itemised=st.booleans())
def test_the_usage_part_of_a_renewal_invoice_is_the_overage_taken_its_lines_rounded_and_is_what_is_receivable(
    money: str, amounts: list[Decimal], posts: list[tuple[str, int]], itemised: bool
) -> None:
    account = BillingAccount.open("prop", money, opened_by="hypothesis")
    for key, amount in posts:  # no credit: every debit is overage, kept under the period rating gave it
        account.debit_usage(command_id=uuid4(), unit=money, amount=amount, meter="tokens", at=AT,
                            overage_policy="overage", cause={"period": key})
    unbilled = account.unbilled_overage(money)
    assert min(unbilled.values(), default=0) >= 0  # a give-back never leaves a period negative
    own = sum(amount for key, amount in unbilled.items() if key in OWN_KEYS)
    taken = sum(unbilled.values())
    if itemised:  # as rating shows it: the period's usage includes what went beyond credit, at its rated value
        amounts = [*amounts, from_subunits(max(own, 0))]
    invoice = draft(money, amounts)
    usage_lines = list(invoice.lines)

    added = overage_lines(account, invoice, usage_lines, {}, PERIOD_START, PERIOD_END, AT)
    invoice.add_lines(added, by="test")

    part = Decimal(0)
    for item in invoice.lines:
        assert item["kind"] in USAGE_PART
        part = RATING_CONTEXT.add(part, Decimal(item["amount"]))
        if item["kind"] == "credits_applied":
            assert Decimal(item["amount"]) < 0
        if item["kind"] == "overage":
            assert Decimal(item["amount"]) > 0
    usage = sum((Decimal(item["amount"]) for item in usage_lines), Decimal(0))
    exact = sum((to_subunits(Decimal(item["exact_amount"])) for item in usage_lines), 0)
    applied = -sum((Decimal(item["amount"]) for item in invoice.lines if item["kind"] == "credits_applied"),
                   Decimal(0))
    drawn = exact - min(max(own, 0), exact)
    assert applied == min(round_minor(from_subunits(drawn), currency(money)), max(usage, Decimal(0)))
    assert part >= 0
    half = to_subunits(Decimal(1).scaleb(-currency(money).billed_scale)) // 2  # KWD's lines: hundredths
    assert abs(to_subunits(part) - taken) <= (len(usage_lines) + 2) * half, (usage, own, taken, invoice.lines)
    assert account.unbilled_overage(money) == {}
    assert account.invoiced_overage(str(invoice.id)) == ({money: to_subunits(part)} if part else {})
    assert account.overage_receivable(money) == to_subunits(part)


def test_a_period_s_own_overage_under_its_usage_lines_bills_only_that_overage() -> None:
    # 3 meters rated 1.004 + 2.0049 + 0.333333333 = 3.342233333 (lines 1.00 + 2.00 + 0.33 = 3.33); 2.50 of it was
    # overage, so 0.842233333 came from credit, and 0.10 is left from September: 3.33 - 0.84 credits applied + 0.10
    # = 2.59 for 2.60 of overage, the lines rounded down 0.01 (posted, so 2.59 is what is receivable).
    account = BillingAccount.open("prop", "USD", opened_by="hypothesis")
    for key, amount in ((OWN_KEYS[0], 2_500_000_000), ("2026-09", 100_000_000)):
        account.debit_usage(command_id=uuid4(), unit="USD", amount=amount, meter="tokens", at=AT,
                            overage_policy="overage", cause={"period": key})
    invoice = draft("USD", [Decimal("1.004"), Decimal("2.0049"), Decimal("0.333333333")])
    added: list[dict[str, Any]] = overage_lines(account, invoice, list(invoice.lines), {}, PERIOD_START,
                                                PERIOD_END, AT)
    assert [(item["kind"], item["amount"]) for item in added] == [("credits_applied", "-0.84"), ("overage", "0.10")]
    invoice.add_lines(added, by="test")
    assert invoice.total == Decimal("2.59")
    assert account.overage_receivable("USD") == 2_590_000_000
