"""Rounding of a renewal invoice's usage lines against the books (SQLite ledger): the usage lines are rounded once
each, the credits applied are the credit drawn (rounded once), and the difference between the overage posted exact
to the sub-unit and what the invoice bills is posted as rounding, so paying the invoice books its total to the cent
and leaves nothing receivable."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from uuid import uuid4

import pytest
from billing_events.money import currency, from_subunits, round_minor, to_subunits
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.domain.account import BillingAccount, InvalidAmount, InvalidArgument
from billing_ledger.domain.invoice import Invoice
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.subscriptions.test_invoice_books import CATALOG, CENT, account, books, events, first_invoice
from tests.unit.subscriptions.test_invoice_overage import (
    DEC_1,
    JAN_1,
    NOV_1,
    U,
    renew_and_bill,
    run,
    usage_line,
)

USD = currency("USD")


def ledger(tmp: Path) -> LedgerApplication:
    """A subscribed tenant in Germany (19 % VAT) on the 30.00 Team plan, its first invoice finalized."""
    app = LedgerApplication(persistence_env(None, str(tmp)))
    run(app, "catalog.publish", None, document=CATALOG, digest="rounding-1")
    run(app, "account.open", "acme", currency="USD")
    run(app, "tax_profile.set", "acme", country="DE")
    run(app, "subscription.create", "acme", key="m", plan="team")
    return app


def debit_subunits(app: LedgerApplication, amount: int, day: int) -> None:
    """A usage debit of November (rating's period), exact to the sub-unit."""
    run(app, "usage.debit", "acme", at=datetime(2026, 11, day, tzinfo=UTC), unit="USD", amount_subunits=amount,
        meter="api_calls", overage_policy="overage",
        cause={"event_ids": [str(uuid4())], "period": NOV_1.isoformat()})


def kinds(invoice: Invoice) -> list[tuple[str, str]]:
    return [(item["kind"], item["amount"]) for item in invoice.lines]


def pay(app: LedgerApplication, *invoices: Invoice) -> None:
    for n, invoice in enumerate(invoices):
        run(app, "invoice.mark_paid", "acme", at=DEC_1 + timedelta(days=1), invoice_id=str(invoice.id),
            payment=f"pi_{n}")


def test_sub_cent_usage_without_credit_shows_no_credits_applied_and_its_payment_books_the_invoice_total(
        tmp_path: Path) -> None:
    app = ledger(tmp_path)
    for day in (3, 4, 5):  # three meters of 0.005 each, no credit at all: 0.015 posted beyond credit
        debit_subunits(app, 5 * U // 1000, day)
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0.005", meter=m) for m in ("a", "b", "c")])
    # Each usage line is rounded once (0.01) and nothing else: there was no credit to apply (it showed -0.01).
    assert kinds(renewal) == [("base_fee", "30.00"), ("usage", "0.01"), ("usage", "0.01"), ("usage", "0.01"),
                              ("tax", "5.71")]
    assert renewal.total == Decimal("35.74")
    # What the lines bill beyond the 0.015 posted is the lines' rounding, posted to the usage's revenue.
    [rounded] = events(app, "InvoicedOverageRounded")
    assert (rounded.invoice, rounded.amount) == (str(renewal.id), 15 * U // 1000)
    assert account(app).receivable("USD") == to_subunits(first_invoice(app).total + renewal.total)
    pay(app, first_invoice(app), renewal)
    chart = books(app)  # every posting set sums to zero per unit
    # Booked 71.435 (35.70 + 35.735) before: the overage was settled at 0.015 while the invoice billed 0.03.
    assert chart[("gateway_clearing", "USD")] == to_subunits(Decimal("35.70") + Decimal("35.74"))
    assert ("receivables", "USD") not in chart
    assert account(app).overage_rounding(str(renewal.id)) == {}
    assert verify_store(app, "acme").ok


def test_prepaid_credit_applied_is_the_credit_drawn_and_the_payment_settles_the_total_to_the_cent(
        tmp_path: Path) -> None:
    app = ledger(tmp_path)
    run(app, "credit.grant", "acme", grant_key="usd", unit="USD", amount="5.00", source="promotion")
    debit_subunits(app, 28_005_000_000, 3)  # 28.005: 5.00 from credit, 23.005 overage
    debit_subunits(app, 3_135_801_666, 4)  # tokens at 0.000002
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("28.005"), usage_line("3.135801666", meter="tokens")])
    # 5.00 of credit was drawn, not 5.01 (28.01 + 3.14 - 26.14 rounded once): the lines show it as it was.
    assert kinds(renewal)[1:4] == [("usage", "28.01"), ("usage", "3.14"), ("credits_applied", "-5.00")]
    assert renewal.total == Decimal("30.00") + Decimal("26.15") + Decimal("10.67")  # VAT 19 % of 56.15
    pay(app, first_invoice(app), renewal)
    chart = books(app)
    assert chart[("gateway_clearing", "USD")] == to_subunits(Decimal("35.70") + renewal.total)  # not 102.700801666
    assert ("receivables", "USD") not in chart
    # The usage's revenue is what the invoices billed for it: 5.00 of credit and 26.15 paid.
    assert chart[("recognised_revenue", "USD")] == -to_subunits(Decimal("31.15"))
    assert verify_store(app, "acme").ok


def test_a_voided_invoice_takes_its_rounding_back_and_the_next_invoice_bills_the_overage_exact(
        tmp_path: Path) -> None:
    app = ledger(tmp_path)
    debit_subunits(app, 4 * U // 1000, 3)  # 0.004: its line rounds to 0.00
    debit_subunits(app, 1_006 * U // 1000, 4)  # 1.006: its line rounds to 1.01
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0.004"), usage_line("1.006", meter="tokens")])
    assert account(app).overage_receivable("USD") == 101 * CENT  # 1.01 billed for 1.010 used: no rounding
    run(app, "invoice.void", "acme", at=DEC_1, invoice_id=str(renewal.id))
    assert events(app, "InvoicedOverageRounded") == []
    debit_subunits(app, 5 * U // 1000, 5)  # 0.005 more, and the next lines round it up
    renewal = renew_and_bill(app, DEC_1, JAN_1, [])
    assert kinds(renewal)[1] == ("overage", "1.02")  # 1.015 left from earlier periods, rounded once
    [rounded] = events(app, "InvoicedOverageRounded")
    assert rounded.amount == 5 * U // 1000
    run(app, "invoice.void", "acme", at=JAN_1, invoice_id=str(renewal.id))
    # Voided: owed again exactly as used, the rounding taken back from revenue.
    assert account(app).overage_receivable("USD") == 1_015 * U // 1000
    assert account(app).unbilled_overage("USD") == {JAN_1.isoformat(): 1_015 * U // 1000}
    assert books(app)[("recognised_revenue", "USD")] == -1_015 * U // 1000
    assert verify_store(app, "acme").ok


def test_an_invoice_billed_before_its_lines_were_rounded_is_settled_as_recorded() -> None:
    # Invoices finalized before rounding was posted have no InvoicedOverageRounded: paying one settles the overage
    # it took, exact, as then.
    account = BillingAccount.open("acme", "USD", opened_by="test")
    account.debit_usage(command_id=uuid4(), unit="USD", amount=15 * U // 1000, meter="api_calls", at=NOV_1,
                        overage_policy="overage", cause={"period": NOV_1.isoformat()})
    account.invoice_overage(invoice="old", units=["USD"], end=DEC_1, at=DEC_1)
    account.settle_invoiced_overage(invoice="old", at=DEC_1, cause={"payment": "pi_old"})
    [settled] = [e for e in account.collect_events() if type(e).__name__ == "ReceivableSettled"]
    assert settled.amount == 15 * U // 1000
    assert account.overage_receivable("USD") == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usage=st.lists(st.one_of(st.integers(1, 3 * CENT), st.integers(1, 5_000 * CENT)), min_size=1, max_size=4),
       credit=st.integers(0, 50 * CENT))
def test_an_invoice_bills_the_sum_of_its_lines_applies_only_credit_drawn_and_its_payment_books_it_to_the_cent(
        usage: list[int], credit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app = ledger(Path(tmp))
        try:
            if credit:
                run(app, "credit.grant", "acme", grant_key="usd", unit="USD", amount=str(from_subunits(credit)),
                    source="promotion")
            for day, amount in enumerate(usage, start=2):
                debit_subunits(app, amount, day)
            renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line(str(from_subunits(amount)), meter=f"m{n}")
                                                         for n, amount in enumerate(usage)])
            lines = {kind: Decimal(0) for kind in ("usage", "credits_applied")}
            for item in renewal.lines:
                if item["kind"] in lines:
                    lines[item["kind"]] += Decimal(item["amount"])
            assert renewal.total == sum((Decimal(item["amount"]) for item in renewal.lines), Decimal(0))
            drawn = min(credit, sum(usage))
            applied = -lines["credits_applied"]
            # The credit drawn rounded once (half-up, as every line): never credit that was not drawn.
            assert applied == min(round_minor(from_subunits(drawn), USD), lines["usage"])
            assert applied - from_subunits(drawn) <= Decimal("0.005")
            invoices = [first_invoice(app), renewal]
            pay(app, *invoices)
            chart = books(app)  # every posting set sums to zero per unit
            paid = sum((invoice.total for invoice in invoices), Decimal(0))
            assert chart[("gateway_clearing", "USD")] == to_subunits(paid)
            assert ("receivables", "USD") not in chart and account(app).receivable("USD") == 0
        finally:
            app.close()


def test_rounding_more_than_the_lines_can_round_or_not_in_whole_cents_is_refused_and_changes_nothing() -> None:
    account = BillingAccount.open("acme", "USD", opened_by="test")
    account.debit_usage(command_id=uuid4(), unit="USD", amount=15 * U // 1000, meter="api_calls", at=NOV_1,
                        overage_policy="overage", cause={"period": NOV_1.isoformat()})
    account.invoice_overage(invoice="inv", units=["USD"], end=DEC_1, at=DEC_1)
    before = account.version
    with pytest.raises(InvalidAmount, match="more than rounding"):
        account.round_invoiced_overage(invoice="inv", unit="USD", billed=5 * CENT, bound=CENT // 2, at=DEC_1)
    with pytest.raises(InvalidAmount, match="not whole minor units"):
        account.round_invoiced_overage(invoice="inv", unit="USD", billed=15 * U // 1000, bound=CENT, at=DEC_1)
    assert account.version == before and account.overage_receivable("USD") == 15 * U // 1000
    assert account.round_invoiced_overage(invoice="inv", unit="USD", billed=2 * CENT, bound=CENT, at=DEC_1) == CENT // 2
    with pytest.raises(InvalidArgument, match="already rounded"):
        account.round_invoiced_overage(invoice="inv", unit="USD", billed=2 * CENT, bound=CENT, at=DEC_1)
