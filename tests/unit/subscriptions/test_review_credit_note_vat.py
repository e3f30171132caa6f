"""Session 14 review: the VAT of services paid with a credit note's account credit, on the real ledger and rating
wired by hand (tests/unit/subscriptions/test_cancel_after_period_end.py's ``Stack``). Found by running the month end
of a tenant mix on the real stack (session 14: fixed, the credit is applied after tax as a payment).

A downgrade's credit note gives the unused fee back *with its VAT* as account credit (a ``credit_note`` grant: Dr
recognised revenue net, Dr tax payable VAT, Cr wallet gross), and the renewal invoice takes the credit drawn for usage
off its lines *before* tax ("Prepaid credits applied"): so the usage that credit pays bears no VAT at all, and the VAT
the note gave back is spent as if it were net money. A top-up's credit is the net paid (its VAT booked apart), which
is why taking it off before tax is right for it."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.audit import account_events, verify_store

from tests.unit.subscriptions.test_cancel_after_period_end import Stack, wired_stack

NOV_1, NOV_16, NOV_20 = (datetime(2026, 11, d, tzinfo=UTC) for d in (1, 16, 20))
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
CALLS = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "aggregation": "sum", "price": CALLS}],
    "plans": [{"code": "pro", "name": "Pro", "version": 1, "currency": "USD", "base_fee": "90.00",
               "charges": [{"meter": "api_calls", "price": CALLS}]},
              {"code": "team", "name": "Team", "version": 1, "currency": "USD", "base_fee": "30.00",
               "charges": [{"meter": "api_calls", "price": CALLS}]}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing GmbH", "country": "DE"},
}


def books(stack: Stack) -> dict[str, Decimal]:
    """The account's ledger accounts in USD (debit positive), from every posting it recorded."""
    sums: dict[str, int] = defaultdict(int)
    for event in account_events(stack.ledger, "acme"):
        for line in getattr(event, "postings", None) or []:
            sums[line["account"]] += line["amount"]
    return {account: Decimal(amount) / SUBUNITS_PER_UNIT for account, amount in sums.items()}


async def settle(stack: Stack) -> None:
    for _ in range(3):  # the ledger's events to rating, rating's commands (close, usage lines) to the ledger
        await stack.relay()
        await stack.deliver()


async def test_services_paid_with_a_credit_notes_credit_bear_their_vat(tmp_path: Path) -> None:
    """A DE consumer on Pro (90.00 + 17.10 VAT, Nov 1), downgraded to Team on Nov 16: a credit note of 45.00 - 15.00
    = 30.00 + 5.70 VAT, given as 35.70 of account credit. 357 calls on Nov 20 (35.70) draw it; the Dec 1 renewal
    bills Team's 30.00 + 35.70 of calls - 35.70 of credits applied + 5.70 VAT. The account was billed 125.70 of
    services net (60.00 of fees for November, 35.70 of calls, 30.00 for December), which bear 23.88 of VAT; the books
    and documents hold 17.10 - 5.70 + 5.70 = 17.10 (the calls' 6.78 never charged). The review's tenant A: its
    downgrade's note gave 65.26 (10.42 of it VAT) as credit."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("tax_profile.set", NOV_1, country="DE")
        stack.run("subscription.create", NOV_1, key="m", plan="pro")
        await settle(stack)
        stack.run("subscription.change", NOV_16, key="m", plan="team")
        await settle(stack)
        await stack.use("u1", "357", NOV_20)
        stack.run("subscription.tick", DEC_1, key="m")
        await settle(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        documents = {key: (i.status, i.total) for key, i in stack.invoices().items()}
        issued = [i for i in stack.invoices().values() if i.status != "void"]
        renewal = stack.invoice(DEC_1.isoformat())
        ledger = books(stack)
        audit = verify_store(stack.ledger, "acme")
    revenue = -(ledger.get("recognised_revenue", Decimal(0)) + ledger.get("deferred_revenue", Decimal(0)))
    assert revenue == Decimal("125.70"), (revenue, ledger, documents)
    vat_due = (revenue * Decimal("0.19")).quantize(Decimal("0.01"), ROUND_HALF_UP)  # 23.88
    assert -ledger["tax_payable"] == vat_due, (ledger, documents)
    # The documents declare the VAT the books hold, and the renewal shows the credit as a payment after its tax:
    # 30.00 + 35.70 of calls, 19 % of 65.70, then the note's 35.70 of credit: 42.48 to pay.
    assert sum((Decimal(x["amount"]) for i in issued for x in i.lines if x["kind"] == "tax"), Decimal(0)) == vat_due
    assert [(x["kind"], x["amount"]) for x in renewal.lines] == [
        ("base_fee", "30.00"), ("usage", "35.70"), ("tax", "12.48"), ("credits_applied", "-35.70")], renewal.lines
    assert renewal.lines[-1]["description"] == "Credit note credit applied (a payment, after tax)"
    assert renewal.total == Decimal("42.48") and renewal.lines[2]["description"] == "DE VAT 19 % of 65.70"
    assert audit.ok, audit.problems
