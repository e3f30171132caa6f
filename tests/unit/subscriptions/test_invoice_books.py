"""Subscription invoices and credit notes in the account's double entry (SQLite ledger): what finalizing and
paying them posts, what a credit note gives back, what a free plan and a top-up invoice post (nothing)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand, PaymentNotification
from billing_events.money import to_subunits
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import verify_store
from billing_ledger.digest import summarize
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.domain.subscription import Subscription, subscription_id
from billing_ledger.payment_commands import payment_command

from tests.unit.subscriptions import test_invoice_overage as overage
from tests.unit.subscriptions.test_invoice_overage import (
    DEC_1,
    JAN_1,
    NOV_1,
    U,
    debit,
    renew_and_bill,
    run,
    usage_line,
)

CENT = U // 100
NOV_16 = datetime(2026, 11, 16, tzinfo=UTC)
CATALOG: dict[str, Any] = {
    "credit_units": overage.CATALOG["credit_units"],
    "meters": overage.CATALOG["meters"],
    "plans": [{"code": "team", "name": "Team", "currency": "USD", "base_fee": "30.00"},
              {"code": "team-yearly", "name": "Team yearly", "currency": "USD", "cadence": "year",
               "base_fee": "360.00"},
              {"code": "team-credits", "name": "Team with credits", "currency": "USD", "base_fee": "30.00",
               "recurring_credits": [{"unit": "CREDIT", "amount": "200"}]},
              {"code": "free", "name": "Free", "currency": "USD", "base_fee": "0.00",
               "recurring_credits": [{"unit": "CREDIT", "amount": "100"}]}],
    "packages": [{"code": "usd-20", "name": "20 USD", "unit": "USD", "credits": "20", "price": "20.00",
                  "currency": "USD"}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing GmbH", "country": "DE"},
}


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="books-1")
    run(ledger, "account.open", "acme", currency="USD")
    run(ledger, "tax_profile.set", "acme", country="DE")  # a consumer in Germany: 19 % VAT
    return ledger


def account(app: LedgerApplication) -> BillingAccount:
    return app.repository.get(ids.account_id("acme"))  # type: ignore[no-any-return]


def books(app: LedgerApplication) -> dict[tuple[str, str], int]:
    """The account's chart of accounts from its events' postings; asserts they sum to zero per unit."""
    postings = [p for e in app.events.get(ids.account_id("acme")) for p in getattr(e, "postings", None) or []]
    balances = account_balances(postings)
    for unit in {u for _, u in balances}:
        assert sum(v for (_, u), v in balances.items() if u == unit) == 0
    return {k: v for k, v in balances.items() if v}


def events(app: LedgerApplication, name: str) -> list[Any]:
    return [e for e in app.events.get(ids.account_id("acme")) if type(e).__name__ == name]


def first_invoice(app: LedgerApplication, key: str = "m") -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', key)}/{NOV_1.isoformat()}"))


def test_an_invoice_posts_its_fee_and_tax_when_finalized_and_settles_them_when_paid(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = first_invoice(app)
    assert (invoice.status, invoice.total) == ("finalized", Decimal("35.70"))  # 30.00 + 5.70 VAT
    assert account(app).receivable("USD") == 3570 * CENT
    # The fee is billed in advance for November: deferred, recognised over the month (see the tests below).
    assert books(app) == {("receivables", "USD"): 3570 * CENT, ("deferred_revenue", "USD"): -3000 * CENT,
                          ("tax_payable", "USD"): -570 * CENT}
    run(app, "invoice.mark_paid", "acme", at=NOV_16, invoice_id=str(invoice.id), payment="pi_1")
    assert account(app).receivable("USD") == 0
    assert books(app) == {("gateway_clearing", "USD"): 3570 * CENT, ("deferred_revenue", "USD"): -3000 * CENT,
                          ("tax_payable", "USD"): -570 * CENT}
    # Paid again (the webhook after dunning's mark_paid): nothing more.
    run(app, "invoice.mark_paid", "acme", at=NOV_16, invoice_id=str(invoice.id), payment="pi_1")
    assert len(events(app, "InvoicePaid")) == 1
    assert verify_store(app, "acme").ok


def test_a_renewal_invoice_posts_its_fee_and_tax_and_its_payment_settles_the_overage_too(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "2.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # overage: receivable already
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("2.00")])
    # December's 30.00 + November's 2.00 usage, and 19 % VAT on the 32.00.
    assert renewal.total == Decimal("38.08")
    [billed] = [e for e in events(app, "InvoiceBilled") if e.invoice == str(renewal.id)]
    assert (billed.amount, billed.tax_amount) == (3608 * CENT, 608 * CENT)  # the usage is not posted twice
    run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(renewal.id), payment="pi_2")
    run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(first_invoice(app).id), payment="pi_1")
    after = account(app)
    assert after.receivable("USD") == 0  # fee, tax and overage of both invoices settled
    chart = books(app)
    assert chart[("gateway_clearing", "USD")] == 3570 * CENT + 3808 * CENT
    assert chart[("tax_payable", "USD")] == -(570 + 608) * CENT
    # Both fees are deferred until a recognition run; the usage is revenue at once.
    assert chart[("deferred_revenue", "USD")] == -(3000 + 3000) * CENT
    assert chart[("recognised_revenue", "USD")] == -200 * CENT
    assert verify_store(app, "acme").ok


def test_a_downgrade_credit_note_becomes_account_credit_in_the_currency(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=3)  # 90.00 + 17.10 VAT
    result = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=1)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    assert (note.document_type, note.total) == ("credit_note", Decimal("-35.70"))  # -30.00 and -5.70 VAT
    after = account(app)
    assert after.available("USD") == 3570 * CENT  # spendable credit, with the VAT given back
    [grant] = [g for g in after.grant_balances() if g["source"] == "credit_note"]
    assert (grant["amount"], grant["expires_at"], grant["scope"]) == (3570 * CENT, None, None)
    assert after.receivable("USD") == 10710 * CENT  # the invoice is still owed in full (it is charged so)
    # The 90.00 deferred for November: half of it given back (the unused time), the half used is recognised at the
    # change, and the new 15.00 for the rest of the month is deferred anew.
    assert books(app) == {("receivables", "USD"): 10710 * CENT, ("tenant_wallet", "USD"): -3570 * CENT,
                          ("recognised_revenue", "USD"): -4500 * CENT, ("deferred_revenue", "USD"): -1500 * CENT,
                          ("tax_payable", "USD"): -(1710 - 570) * CENT}
    assert verify_store(app, "acme").ok


def test_a_cancel_after_a_tax_profile_was_set_credits_the_unused_fee_without_tax_never_charged(
        app: LedgerApplication) -> None:
    run(app, "tax_profile.set", "acme", country="US")  # no tax rule: the first invoice has no tax
    run(app, "subscription.create", "acme", key="m", plan="team")
    assert first_invoice(app).total == Decimal("30.00")
    run(app, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="DE")  # 19 % from now on
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel"))
    # Half the 30.00 fee back, and no VAT: the invoice it corrects charged none (it was 17.85, 2.85 of VAT
    # given back that was never collected, and tax payable went negative).
    assert (note.total, note.related_invoice) == (Decimal("-15.00"), str(first_invoice(app).id))
    assert account(app).available("USD") == 1500 * CENT
    assert ("tax_payable", "USD") not in books(app)
    assert verify_store(app, "acme").ok


def test_a_downgrade_after_a_tax_profile_was_set_taxes_only_the_new_charge(app: LedgerApplication) -> None:
    run(app, "tax_profile.set", "acme", country="US")
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=3)  # 90.00, no tax
    run(app, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="DE")
    result = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=1)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    # -45.00 unused at no tax, +15.00 for the rest of the period at today's 19 % (2.85): 27.15 of credit.
    assert note.total == Decimal("-27.15")
    assert account(app).available("USD") == 2715 * CENT
    assert books(app)[("tax_payable", "USD")] == -285 * CENT  # the new charge's VAT is owed, nothing given back
    assert verify_store(app, "acme").ok


def test_a_cancel_after_the_tax_profile_changed_gives_back_the_tax_the_invoice_charged(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT
    run(app, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="US")  # no tax from now on
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel"))
    assert note.total == Decimal("-17.85")  # 15.00 and the 2.85 of VAT charged on it (it was 15.00)
    assert books(app)[("tax_payable", "USD")] == -285 * CENT  # 5.70 collected, 2.85 given back
    assert verify_store(app, "acme").ok


def test_a_cancel_after_a_resume_gives_back_the_tax_the_resumes_invoice_charged(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT
    run(app, "subscription.pause", "acme", at=datetime(2026, 11, 20, tzinfo=UTC), key="m")
    run(app, "subscription.tick", "acme", at=DEC_1, key="m")  # December begins paused: not billed
    run(app, "subscription.resume", "acme", at=DEC_1, key="m")  # ... until now: all of December, 30.00 + 5.70
    sub_id = subscription_id("acme", "m")
    resumed = app.repository.get(invoice_id("acme", f"{sub_id}/resume/{DEC_1.isoformat()}"))
    assert resumed.total == Decimal("35.70")
    run(app, "tax_profile.set", "acme", at=datetime(2026, 12, 5, tzinfo=UTC), country="US")  # no tax from now on
    run(app, "subscription.cancel", "acme", at=datetime(2026, 12, 16, 12, tzinfo=UTC), key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{sub_id}/cancel"))
    # Half of December back with the 2.85 of VAT the resume's invoice charged on it (it was 15.00: the period's
    # invoice was looked up by the period's key, found none, and today's 0 % applied).
    assert (note.total, note.related_invoice) == (Decimal("-17.85"), str(resumed.id))
    assert account(app).available("USD") == 1785 * CENT
    assert books(app)[("tax_payable", "USD")] == -(570 + 570 - 285) * CENT
    assert verify_store(app, "acme").ok


def test_a_cancel_after_a_cadence_change_gives_back_the_tax_the_changes_document_charged(
        app: LedgerApplication) -> None:
    run(app, "tax_profile.set", "acme", country="US")  # no tax rule: the first invoice has no tax
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00
    run(app, "tax_profile.set", "acme", at=datetime(2026, 11, 10, tzinfo=UTC), country="DE")  # 19 % from now on
    change = run(app, "subscription.change", "acme", at=NOV_16, key="m", plan="team-yearly")
    sub_id = subscription_id("acme", "m")
    yearly = app.repository.get(invoice_id("acme", f"{sub_id}/change/{change.command_id}"))
    # 15.00 of November back at the 0 % it was invoiced at, a new year from Nov 16 at 360.00 + 68.40 VAT.
    assert yearly.total == Decimal("413.40")
    # Half the year later (182.5 of 365 days left) the cancel credits 180.00 and the 34.20 of VAT the change's
    # invoice charged on it (it was 180.00: the first invoice's 0 %, the only one its key lookup found).
    run(app, "subscription.cancel", "acme", at=datetime(2027, 5, 17, 12, tzinfo=UTC), key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{sub_id}/cancel"))
    assert (note.total, note.related_invoice) == (Decimal("-214.20"), str(yearly.id))
    assert books(app)[("tax_payable", "USD")] == -(6840 - 3420) * CENT
    assert verify_store(app, "acme").ok


def test_a_cancel_after_a_downgrade_gives_back_the_tax_the_downgrade_charged_on_the_new_fee(
        app: LedgerApplication) -> None:
    run(app, "tax_profile.set", "acme", country="US")
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=3)  # 90.00, no tax
    run(app, "tax_profile.set", "acme", at=datetime(2026, 11, 5, tzinfo=UTC), country="DE")
    change = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=1)  # -45.00 at 0 %, 15.00 + 2.85
    run(app, "subscription.cancel", "acme", at=datetime(2026, 11, 25, tzinfo=UTC), key="m", immediately=True)
    sub_id = subscription_id("acme", "m")
    note = app.repository.get(invoice_id("acme", f"{sub_id}/cancel"))
    # The last 6 of 30 days of the 30.00 fee, which the downgrade charged at 19 %: 6.00 + 1.14 (it was 6.00: the
    # period's first invoice, at 0 %, was taken as the one corrected).
    assert (note.total, note.related_invoice) == (
        Decimal("-7.14"), str(invoice_id("acme", f"{sub_id}/change/{change.command_id}")))
    assert books(app)[("tax_payable", "USD")] == -(285 - 114) * CENT
    assert verify_store(app, "acme").ok


def test_a_change_to_a_plan_of_the_same_fee_is_applied_and_a_later_cancel_gives_back_the_vat_paid(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT, 19 % all along
    change = run(app, "subscription.change", "acme", at=datetime(2026, 11, 11, tzinfo=UTC), key="m",
                 plan="team-credits")
    sub_id = subscription_id("acme", "m")
    document = app.repository.get(invoice_id("acme", f"{sub_id}/change/{change.command_id}"))
    # -20.00 unused of the old plan, +20.00 for the rest of the period on the new one: a 0.00 invoice (it was
    # refused ``tax_rate_changed``: the 0.00 net had no tax line, so today's rate read 0 %, not 19 %), settled as it
    # is issued (nothing due: it stayed open before session 14).
    assert (document.status, document.total, document.payment) == ("paid", Decimal("0.00"), "nothing_due")
    assert [(x["kind"], x["amount"], x.get("rate")) for x in document.lines] == [
        ("proration", "-20.00", None), ("proration", "20.00", None), ("tax", "0.00", "0.19")]
    # The last 10 days of the new plan were paid with 19 % VAT: the cancel gives both back.
    run(app, "subscription.cancel", "acme", at=datetime(2026, 11, 21, tzinfo=UTC), key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{sub_id}/cancel"))
    assert (note.total, note.related_invoice) == (Decimal("-11.90"), str(document.id))
    assert account(app).available("USD") == 1190 * CENT
    assert books(app)[("tax_payable", "USD")] == -(570 - 190) * CENT
    assert verify_store(app, "acme").ok


def test_a_credit_note_cannot_be_voided_and_its_credit_and_tax_stay_consistent(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=3)
    result = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=1)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))
    before = books(app)
    refused = run(app, "invoice.void", "acme", at=datetime(2026, 11, 17, tzinfo=UTC), outcome="rejected",
                  invoice_id=str(note.id), reason="issued by mistake")
    assert refused.reason == "credit_note_not_voidable", refused
    # Nothing changed: the note stands with its 35.70 of credit and its VAT given back (a void that left both
    # in place made a document void whose money still moved).
    assert app.repository.get(note.id).status == "finalized"
    assert account(app).available("USD") == 3570 * CENT and books(app) == before
    assert verify_store(app, "acme").ok


def test_voiding_an_unpaid_invoice_reverses_what_it_billed(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    run(app, "invoice.void", "acme", at=NOV_16, invoice_id=str(first_invoice(app).id), reason="goodwill")
    assert len(events(app, "InvoiceBillVoided")) == 1
    assert account(app).receivable("USD") == 0
    assert books(app) == {}
    assert verify_store(app, "acme").ok


def test_an_invoice_a_cancel_credited_cannot_be_voided_so_the_credit_never_outlives_the_fee(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 35.70, unpaid
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel"))
    assert (note.total, note.related_invoice) == (Decimal("-17.85"), str(first_invoice(app).id))
    before = books(app)
    refused = run(app, "invoice.void", "acme", at=datetime(2026, 11, 17, tzinfo=UTC), outcome="rejected",
                  invoice_id=str(first_invoice(app).id), reason="goodwill")
    # Voided, the fee would no longer be owed while the note's 17.85 of credit for half of it stayed spendable.
    assert refused.reason == "invoice_has_credit_notes" and "CN-2026-000001" in refused.detail, refused
    assert first_invoice(app).status == "finalized" and books(app) == before
    assert (account(app).receivable("USD"), account(app).available("USD")) == (3570 * CENT, 1785 * CENT)
    assert verify_store(app, "acme").ok


def test_a_cancel_after_its_periods_invoice_was_voided_credits_nothing(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    run(app, "invoice.void", "acme", at=NOV_1, invoice_id=str(first_invoice(app).id), reason="goodwill")
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    # The fee was never owed: no unused time of it to give back as account credit.
    assert invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel") not in app.repository
    assert account(app).available("USD") == 0 and books(app) == {}
    assert verify_store(app, "acme").ok


def test_a_top_up_invoice_is_not_posted_again(app: LedgerApplication) -> None:
    placed = run(app, "checkout.place", "acme", package="usd-20", key="o1", gateway="stripe").value
    total = placed["quote"]["total"]
    run(app, "order.paid_off_session", "acme", key="o1", gateway="stripe", payment_id="pi_o1", amount=total,
        currency="USD")
    invoice = app.repository.get(invoice_id("acme", f"orders/{placed['order_id']}"))
    assert invoice.status in ("finalized", "paid")
    assert events(app, "InvoiceBilled") == [] and events(app, "InvoicePaid") == []
    # The purchase alone: 20.00 + 3.80 VAT taken in, 20.00 to spend; nothing receivable.
    assert books(app) == {("gateway_clearing", "USD"): 2380 * CENT, ("tenant_wallet", "USD"): -2000 * CENT,
                          ("tax_payable", "USD"): -380 * CENT}
    assert account(app).receivable("USD") == 0


def test_a_free_plan_gets_no_numbered_zero_invoice(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="f", plan="free")
    first = first_invoice(app, "f")
    assert (first.status, first.number) == ("void", None)  # nothing to bill: no number, no email
    renewal = renew_and_bill_free(app)
    assert (renewal.status, renewal.number) == ("void", None)
    assert events(app, "InvoiceBilled") == [] and account(app).receivable("USD") == 0
    # A paid plan's invoice takes the next number: none was used up by the free plan.
    run(app, "subscription.create", "acme", key="m", plan="team")
    assert first_invoice(app).number == "INV-2026-000001"


def renew_and_bill_free(app: LedgerApplication) -> Invoice:
    run(app, "subscription.tick", "acme", at=DEC_1, key="f")
    key = f"{subscription_id('acme', 'f')}/{DEC_1.isoformat()}"
    run(app, "invoice.usage_lines", "acme", at=DEC_1, invoice_key=key, lines=[], period_start=NOV_1.isoformat(),
        period_end=DEC_1.isoformat())
    return app.repository.get(invoice_id("acme", key))  # type: ignore[no-any-return]


def test_credit_overage_billed_in_the_currency_is_money_in_the_currencys_books(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "50", NOV_1, datetime(2026, 11, 20, tzinfo=UTC), unit="CREDIT", meter="tokens")  # no credit: owed
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("0", meter="tokens")])
    assert renewal.total == Decimal("41.65")  # 30.00 fee + 50 CREDIT at 0.10 = 35.00, and 19 % VAT
    for invoice in (renewal, first_invoice(app)):
        run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(invoice.id), payment=f"pi-{invoice.id}")
    chart = books(app)
    # Every cent the customer paid is in the currency's clearing account, and the credits owed are closed.
    assert chart[("gateway_clearing", "USD")] == 3570 * CENT + 4165 * CENT
    assert ("receivables", "USD") not in chart and ("receivables", "CREDIT") not in chart
    assert verify_store(app, "acme").ok


def test_a_correction_of_usage_already_invoiced_comes_back_as_credit_and_the_invoice_is_collected_as_issued(
        app: LedgerApplication) -> None:
    run(app, "tax_profile.set", "acme", country="US")  # no tax: the figures stay round
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # owed, billed on the renewal
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    assert renewal.total == Decimal("35.00")
    # Rating corrects November's usage by -2.00 after the invoice went out, before it is paid.
    debit(app, "-2.00", NOV_1, datetime(2026, 12, 2, tzinfo=UTC))
    assert account(app).available("USD") == 200 * CENT  # given back as credit to spend
    assert account(app).unbilled_overage("USD") == {}  # nothing left to bill (or to take off the next invoice)
    for invoice in (first_invoice(app), renewal):
        run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(invoice.id), payment=f"pi-{invoice.id}")
    chart = books(app)
    assert chart[("gateway_clearing", "USD")] == 3000 * CENT + 3500 * CENT  # every cent paid is in the books
    assert ("receivables", "USD") not in chart  # and nothing stays owed
    assert verify_store(app, "acme").ok


def test_changes_recorded_before_they_named_their_document_replay_as_they_were_found() -> None:
    team, yearly = {"cadence": "month", **CATALOG["plans"][0], "version": 1}, {**CATALOG["plans"][1], "version": 1}
    sub = Subscription.start(tenant="acme", key="m", plan=team, quantity=1, time_zone="UTC", at=NOV_1, trial=False,
                             by="user:test")
    first = str(invoice_id("acme", f"{sub.id}/{NOV_1.isoformat()}"))
    assert sub.period_invoice == first
    line = {"kind": "proration", "amount": "15.00"}
    sub.change(plan=team, quantity=2, at=NOV_16, by="user:test", lines=[line], invoice=uuid4())
    sub.change(plan=yearly, quantity=2, at=NOV_16, by="user:test", lines=[line], invoice=uuid4())
    started, *changes = sub.collect_events()
    for event in changes:  # as recorded before ``Changed.invoice`` existed
        object.__delattr__(event, "invoice")
    replayed = started.mutate(None)
    # A quantity change's credit still corrects the period's invoice, as the key lookup found it; a cadence
    # change's new period has no known document (its credit is taxed at today's rate, as before).
    assert changes[0].mutate(replayed).period_invoice == first
    assert changes[1].mutate(replayed).period_invoice is None


def correct(app: LedgerApplication, amount: str, period: datetime, open_period: datetime, at: datetime,
            event: str = "evt-1") -> None:
    """A correction's give-back as rating sends it once ``period`` is invoiced (closed): rated into the open period,
    naming the original's period and event (``late``, ``original_period``, ``corrects``)."""
    run(app, "usage.debit", "acme", at=at, unit="USD", amount_subunits=int(Decimal(amount) * U), meter="api_calls",
        overage_policy="overage",
        cause={"event_ids": [str(uuid4())], "period": open_period.isoformat(), "late": "late",
               "original_period": period.isoformat(), "corrects": event})


def usage_correction_notes(app: LedgerApplication) -> list[Invoice]:
    """The credit notes corrections of invoiced usage issued, oldest first."""
    return [app.repository.get(UUID(e.note)) for e in events(app, "InvoicedUsageCredited") if e.note]


def test_a_correction_of_invoiced_usage_credits_it_with_the_tax_that_invoice_charged(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # overage, billed on the renewal
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    assert renewal.total == Decimal("41.65")  # 30.00 + 5.00, and 6.65 of VAT
    for invoice in (first_invoice(app), renewal):
        run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(invoice.id), payment=f"pi-{invoice.id}")
    # November's usage is corrected from 5.00 to 3.00 after the invoice was paid.
    correct(app, "-2.00", NOV_1, DEC_1, datetime(2026, 12, 3, tzinfo=UTC))
    [note] = usage_correction_notes(app)
    # A credit note against the renewal: the 2.00 and the 0.38 of VAT it charged on them (it was 2.00 of credit,
    # no document, and the 0.38 stayed in tax payable).
    assert (note.document_type, note.status, note.related_invoice) == ("credit_note", "finalized", str(renewal.id))
    assert [(x["kind"], x["amount"]) for x in note.lines] == [("usage_correction", "-2.00"), ("tax", "-0.38")]
    assert note.total == Decimal("-2.38") and note.number == "CN-2026-000001"
    assert app.repository.get(renewal.id).corrections == [str(note.id)]
    after = account(app)
    assert after.available("USD") == 238 * CENT and after.receivable("USD") == 0
    [grant] = [g for g in after.grant_balances() if g["source"] == "credit_note"]
    assert grant["amount"] == 238 * CENT
    chart = books(app)  # every movement sums to zero
    assert chart == {("gateway_clearing", "USD"): (3570 + 4165) * CENT, ("tenant_wallet", "USD"): -238 * CENT,
                     ("recognised_revenue", "USD"): -(500 - 200) * CENT, ("deferred_revenue", "USD"): -6000 * CENT,
                     ("tax_payable", "USD"): -(570 + 665 - 38) * CENT}
    assert verify_store(app, "acme").ok


def test_a_correction_of_usage_on_an_unpaid_invoice_is_a_credit_note_and_the_invoice_is_collected_as_issued(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    correct(app, "-2.00", NOV_1, DEC_1, datetime(2026, 12, 2, tzinfo=UTC))
    [note] = usage_correction_notes(app)
    assert (note.total, note.related_invoice) == (Decimal("-2.38"), str(renewal.id))
    # Account credit, like a change's or cancel's note: the invoice is still owed in full (payments must match it).
    assert (account(app).available("USD"), account(app).receivable("USD")) == (238 * CENT, (3570 + 4165) * CENT)
    refused = run(app, "invoice.void", "acme", at=datetime(2026, 12, 3, tzinfo=UTC), outcome="rejected",
                  invoice_id=str(renewal.id), reason="goodwill")
    assert refused.reason == "invoice_has_credit_notes"
    for invoice in (first_invoice(app), renewal):
        run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(invoice.id), payment=f"pi-{invoice.id}")
    assert account(app).receivable("USD") == 0
    assert books(app)[("tax_payable", "USD")] == -(570 + 665 - 38) * CENT
    assert verify_store(app, "acme").ok


def test_a_correction_credits_at_most_the_overage_the_invoice_billed_and_gives_back_the_rest_as_before(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    run(app, "credit.grant", "acme", grant_key="usd", unit="USD", amount="2.00")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # 2.00 from credit, 3.00 overage
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    assert renewal.total == Decimal("39.27")  # 30.00 + 5.00 - 2.00 applied, and 6.27 of VAT on the 33.00
    correct(app, "-4.00", NOV_1, DEC_1, datetime(2026, 12, 2, tzinfo=UTC))
    # The invoice billed 3.00 of it (and VAT on them): those come back with their VAT; the 1.00 prepaid credit paid
    # (untaxed, not on the invoice's total) goes back to that credit.
    [note] = usage_correction_notes(app)
    assert note.total == Decimal("-3.57")
    assert account(app).available("USD") == 357 * CENT + 100 * CENT
    # A second correction finds nothing of the invoice left to credit: given back as credit, as before.
    correct(app, "-0.50", NOV_1, DEC_1, datetime(2026, 12, 3, tzinfo=UTC), event="evt-2")
    assert len(usage_correction_notes(app)) == 1
    assert account(app).available("USD") == 357 * CENT + 150 * CENT
    assert books(app)[("tax_payable", "USD")] == -(570 + 627 - 57) * CENT
    assert verify_store(app, "acme").ok


def test_a_correction_of_a_period_two_invoices_billed_credits_each_with_its_tax_newest_first(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "15.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))  # November: 15.00, billed on Dec 1
    december = renew_and_bill(app, NOV_1, DEC_1, [usage_line("15.00")])
    # A late correction raises November by 5.00 (priced on November): the January renewal bills it.
    debit(app, "5.00", NOV_1, datetime(2026, 12, 5, tzinfo=UTC))
    january = renew_and_bill(app, DEC_1, JAN_1, [])
    assert [(x["kind"], x["amount"]) for x in january.lines if x["kind"] != "base_fee"] == [
        ("overage", "5.00"), ("tax", "6.65")]
    # A second correction lowers November to 5.00: the 20.00 billed less 5.00, 15.00 and their 19 % VAT come back,
    # against each invoice what it billed (the newest first). It was one note of 5.95 against January and 10.00 of
    # credit without VAT (December's record was forgotten when January billed the period).
    correct(app, "-15.00", NOV_1, JAN_1, datetime(2027, 1, 5, tzinfo=UTC))
    notes = usage_correction_notes(app)
    assert [(n.related_invoice, n.total) for n in notes] == [(str(january.id), Decimal("-5.95")),
                                                             (str(december.id), Decimal("-11.90"))]
    assert account(app).available("USD") == 1785 * CENT  # 15.00 + 2.85 VAT, nothing else
    assert books(app)[("tax_payable", "USD")] == -(570 + 855 + 665 - 285) * CENT
    assert account(app).billed_overage("USD", NOV_1.isoformat()) == [{"invoice": str(december.id), "amount": 500 * CENT}]
    assert verify_store(app, "acme").ok


def gateway_refund(app: LedgerApplication, invoice: Invoice, amount: str, at: datetime) -> None:
    refund = PaymentNotification(gateway="stripe", gateway_event_id=f"evt_re_{amount}", kind="refund_succeeded",
                                 tenant="acme", order_id=str(invoice.id), invoice_id=str(invoice.id),
                                 amount=Decimal(amount), currency="USD", verified_at=at,
                                 gateway_reference=f"re_{amount}", refunded_payment="pi_1")
    [result] = app.apply_commands([payment_command(refund)])
    assert result.outcome == "applied", result


@pytest.mark.parametrize(("refunded", "credited"), [("41.65", None), ("40.00", Decimal("-1.64"))])
def test_a_correction_after_a_refund_credits_at_most_what_the_invoice_has_not_given_back(
        app: LedgerApplication, refunded: str, credited: Decimal | None) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])  # 35.00 + 6.65 VAT
    run(app, "invoice.mark_paid", "acme", at=DEC_1, invoice_id=str(renewal.id), payment="pi_1")
    gateway_refund(app, renewal, refunded, datetime(2026, 12, 2, tzinfo=UTC))
    correct(app, "-2.00", NOV_1, DEC_1, datetime(2026, 12, 3, tzinfo=UTC))  # 2.00 + 0.38 VAT, if it had them left
    # Refunded in full: nothing more (it was a 2.38 note on top of the 41.65 refunded). In part: at most the 1.65 it
    # has left, net and VAT at its rate rounded down (1.38 + 0.26), as a change's credit is capped.
    assert [n.total for n in usage_correction_notes(app)] == ([credited] if credited else [])
    assert account(app).available("USD") == (-to_subunits(credited) if credited else 0)
    assert app.repository.get(renewal.id).given_back == Decimal(refunded) - (credited or 0)  # a later refund: capped
    assert verify_store(app, "acme").ok


def test_a_usage_correction_note_is_issued_when_the_correction_is_not_at_the_corrected_usages_time(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    debit(app, "5.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    renew_and_bill(app, NOV_1, DEC_1, [usage_line("5.00")])
    received = datetime(2027, 1, 5, tzinfo=UTC)
    # Rating's give-back carries the corrected usage's time; the command is issued when the correction arrives.
    command = LedgerCommand(command_id=uuid4(), kind="usage.debit", tenant="acme", issued_at=received,
                            issued_by="service:rating",
                            payload={"at": datetime(2026, 11, 20, tzinfo=UTC).isoformat(), "unit": "USD",
                                     "amount_subunits": -200 * CENT, "meter": "api_calls", "overage_policy": "overage",
                                     "cause": {"event_ids": ["evt-fix"], "period": JAN_1.isoformat(), "late": "late",
                                               "original_period": NOV_1.isoformat(), "corrects": "evt-1"}})
    [result] = app.apply_commands([command])
    assert result.outcome == "applied", result
    [note] = usage_correction_notes(app)
    # In 2027's sequence, dated (and due) from the day it is issued: it was CN-2026-000001 of 2026-11-20, before the
    # invoice it corrects.
    [finalized] = [e for e in app.events.get(note.id) if type(e).__name__ == "Finalized"]
    assert (note.number, finalized.issued_at) == ("CN-2027-000001", received)
    [grant] = [g for g in account(app).grant_balances() if g["source"] == "credit_note"]
    assert grant["effective_at"] == received
    assert verify_store(app, "acme").ok


def test_the_daily_digest_counts_invoice_payments_and_their_gateway_refunds(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = first_invoice(app)  # 30.00 + 5.70 VAT
    run(app, "invoice.mark_paid", "acme", at=NOV_16, invoice_id=str(invoice.id), payment="pi_1")
    gateway_refund(app, invoice, "11.90", datetime(2026, 11, 20, tzinfo=UTC))
    summary, _ = summarize(app, datetime.now(UTC).date(), 0)  # the digest goes by when events were recorded
    # What reached and left the gateway's clearing, as the dashboard's figures count it.
    assert (summary["funds_in"], summary["tax_collected"], summary["refunds"]) == (
        {"USD": 3570 * CENT}, {"USD": 570 * CENT}, {"USD": 1190 * CENT})
    assert summary["refund_count"] == 1


def test_what_a_refund_leaves_owed_after_a_downgrade_is_billed_on_the_next_renewal_untaxed_and_settled_when_paid(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=3)  # 90.00 + 17.10 VAT
    invoice = first_invoice(app)
    run(app, "invoice.mark_paid", "acme", at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(invoice.id),
        payment="pi_1")
    run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=1)  # 35.70 of account credit
    debit(app, "35.70", NOV_1, datetime(2026, 11, 17, tzinfo=UTC))  # all of it spent on usage
    gateway_refund(app, invoice, "107.10", datetime(2026, 11, 18, tzinfo=UTC))
    # The second half of November's seat (15.00 + 2.85 VAT) and the usage paid with credit given back in cash.
    assert account(app).receivable("USD") == 5355 * CENT
    renewal = renew_and_bill(app, NOV_1, DEC_1, [usage_line("35.70")])
    # Billed once, without VAT a second time (its tax is booked): was 30.00 + 5.70 VAT, and the 53.55 owed forever.
    # The usage the credit note's credit paid bears its VAT (6.78 of 35.70): that credit is a payment, applied
    # after tax (it was taken off before tax, the usage untaxed, before session 14).
    assert [(x["kind"], x["amount"]) for x in renewal.lines] == [
        ("base_fee", "30.00"), ("usage", "35.70"), ("overage", "53.55"), ("tax", "12.48"),
        ("credits_applied", "-35.70")]
    assert renewal.total == Decimal("96.03")
    assert account(app).receivable("USD") == 9603 * CENT
    run(app, "invoice.mark_paid", "acme", at=datetime(2026, 12, 2, tzinfo=UTC), invoice_id=str(renewal.id),
        payment="pi_2")
    assert account(app).receivable("USD") == 0
    chart = books(app)
    assert ("receivables", "USD") not in chart
    # The seat's VAT, December's and the usage's, once each.
    assert chart[("tax_payable", "USD")] == -(285 + 570 + 678) * CENT
    january = renew_and_bill(app, DEC_1, JAN_1, [])
    assert january.total == Decimal("35.70")  # billed once
    assert verify_store(app, "acme").ok


def test_what_a_refund_leaves_owed_after_a_cancel_is_repaid_from_the_next_credit_bought(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT
    invoice = first_invoice(app)
    run(app, "invoice.mark_paid", "acme", at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(invoice.id),
        payment="pi_1")
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)  # 17.85 of account credit
    debit(app, "10.00", NOV_1, datetime(2026, 11, 17, tzinfo=UTC))
    gateway_refund(app, invoice, "35.70", datetime(2026, 11, 18, tzinfo=UTC))
    assert (account(app).available("USD"), account(app).receivable("USD")) == (0, 1000 * CENT)
    bought = datetime(2026, 11, 20, tzinfo=UTC)
    placed = run(app, "checkout.place", "acme", at=bought, package="usd-20", key="o1", gateway="stripe").value
    run(app, "order.paid_off_session", "acme", at=bought, key="o1", gateway="stripe", payment_id="pi_o1",
        amount=placed["quote"]["total"], currency="USD")
    # No live subscription will invoice it: the credit bought pays it off first (was 20.00 spendable, 10.00 owed).
    assert (account(app).available("USD"), account(app).receivable("USD")) == (1000 * CENT, 0)
    assert [e.amount for e in events(app, "OverageRepaid")] == [1000 * CENT]
    assert ("receivables", "USD") not in books(app)
    assert verify_store(app, "acme").ok


def test_a_refund_recorded_before_its_owed_excess_was_overage_replays_as_it_was(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    invoice = first_invoice(app)
    run(app, "invoice.mark_paid", "acme", at=NOV_16, invoice_id=str(invoice.id), payment="pi_1")
    run(app, "subscription.cancel", "acme", at=NOV_16, key="m", immediately=True)
    debit(app, "10.00", NOV_1, datetime(2026, 11, 17, tzinfo=UTC))
    gateway_refund(app, invoice, "35.70", datetime(2026, 11, 18, tzinfo=UTC))
    assert account(app).unbilled_overage("USD") == {"refund:2026-11-18T00:00:00+00:00": 1000 * CENT}
    recorded = list(app.events.get(ids.account_id("acme")))
    [refunded] = [e for e in recorded if type(e).__name__ == "InvoicePaymentRefunded"]
    del refunded.reclaimed["period"]  # as recorded before session 8
    replayed = None
    for event in recorded:
        replayed = event.mutate(replayed)
    assert replayed is not None
    # Owed, but never billed nor repaid, as it was.
    assert (replayed.receivable("USD"), replayed.unbilled_overage("USD")) == (1000 * CENT, {})


def change_invoice(app: LedgerApplication, result: Any) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/change/{result.command_id}"))


def test_voiding_an_upgrades_invoice_gives_its_credit_back_so_a_cancel_credits_the_first_invoices_unused_time(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    upgrade = change_invoice(app, run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=2))
    assert upgrade.total == Decimal("17.85")  # -15.00 unused time of the first invoice + 30.00, and 2.85 VAT
    run(app, "invoice.void", "acme", at=datetime(2026, 11, 17, tzinfo=UTC), invoice_id=str(upgrade.id),
        reason="goodwill")
    # The void forgave the upgrade and the credit it netted: the first invoice is owed in full, nothing given back.
    result = run(app, "subscription.cancel", "acme", at=datetime(2026, 11, 21, tzinfo=UTC), key="m",
                 immediately=True)
    # The cancel credits the unused Nov 21 - Dec 1 of the first invoice, the period's live invoice: 10.00 + 1.90 VAT
    # (was nothing: it credited the voided upgrade's invoice, 35.70 owed for 20 days, more than without the void).
    assert [item["amount"] for item in result.value["lines"]] == ["-10.00"]
    note = app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/cancel"))
    assert (note.total, note.related_invoice) == (Decimal("-11.90"), str(first_invoice(app).id))
    assert (account(app).receivable("USD"), account(app).available("USD")) == (3570 * CENT, 1190 * CENT)
    # 20 days of one seat, as without the upgrade (without the void: 25.00, the upgrade's 5 days of two seats).
    chart = books(app)
    assert chart[("receivables", "USD")] + chart[("tenant_wallet", "USD")] == 2380 * CENT
    assert chart[("tax_payable", "USD")] == -380 * CENT
    assert chart[("recognised_revenue", "USD")] == -2000 * CENT and ("deferred_revenue", "USD") not in chart
    assert first_invoice(app).given_back == Decimal("11.90")  # credited once
    assert verify_store(app, "acme").ok


def test_after_a_voided_upgrade_a_change_back_credits_what_the_first_invoice_billed(app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")
    upgrade = change_invoice(app, run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=2))
    run(app, "invoice.void", "acme", at=datetime(2026, 11, 17, tzinfo=UTC), invoice_id=str(upgrade.id),
        reason="goodwill")
    back = run(app, "subscription.change", "acme", at=datetime(2026, 11, 21, tzinfo=UTC), key="m", quantity=1)
    # One seat's unused 10 days of the first invoice against one seat for them: nothing to pay, nothing credited
    # (was -20.00 for two seats of the voided upgrade: 10.00 of account credit for a fee never owed).
    assert [item["amount"] for item in back.value["lines"]] == ["-10.00", "10.00"]
    assert change_invoice(app, back).related_invoice == str(first_invoice(app).id)
    assert (account(app).receivable("USD"), account(app).available("USD")) == (3570 * CENT, 0)
    chart = books(app)
    assert chart[("deferred_revenue", "USD")] == -1000 * CENT  # Nov 21 - Dec 1, one seat
    assert chart[("recognised_revenue", "USD")] == -2000 * CENT
    assert verify_store(app, "acme").ok


def test_a_change_after_the_periods_invoice_was_voided_bills_the_new_plans_rest_with_no_credit(
        app: LedgerApplication) -> None:
    run(app, "subscription.create", "acme", key="m", plan="team")  # Nov 1 - Dec 1: 30.00 + 5.70 VAT
    run(app, "invoice.void", "acme", at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(first_invoice(app).id),
        reason="goodwill")  # the period is not billed
    changed = run(app, "subscription.change", "acme", at=NOV_16, key="m", quantity=2)
    # Two seats for Nov 16 - Dec 1, nothing credited: the voided invoice billed nothing to give back (was -15.00 of
    # its unused time against 30.00: 15.00 for the rest of the period at two seats).
    assert [item["amount"] for item in changed.value["lines"]] == ["30.00"]
    invoice = change_invoice(app, changed)
    assert (invoice.document_type, invoice.total) == ("invoice", Decimal("35.70"))
    assert first_invoice(app).given_back == 0
    assert (account(app).receivable("USD"), account(app).available("USD")) == (3570 * CENT, 0)
    run(app, "money.recognise", "acme", at=DEC_1, now=DEC_1.isoformat())
    chart = books(app)
    # The change's 30.00 earned over Nov 16 - Dec 1; nothing negative, nothing left deferred.
    assert chart[("recognised_revenue", "USD")] == -3000 * CENT and ("deferred_revenue", "USD") not in chart
    assert (chart[("receivables", "USD")], chart[("tax_payable", "USD")]) == (3570 * CENT, -570 * CENT)
    assert verify_store(app, "acme").ok
