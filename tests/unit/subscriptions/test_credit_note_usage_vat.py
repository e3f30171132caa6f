"""Usage paid with a credit note's account credit outside any subscription invoice bears its VAT (session 15): the
real ledger and rating wired by hand (``test_cancel_after_period_end.Stack``), the month closed by the ledger's own
expiry sweep, as in production.

A cancel's credit note gives the unused fee back *with its VAT* as account credit (a means of payment). Session 14
made a renewal invoice tax the usage that credit pays and apply it after tax; a tenant without a subscription (after
the cancel: usage at list price, by calendar month) or a captured hold gets no renewal, so those services were never
taxed: 100.00 of usage paid with the note's 119.00 left 19.00 of VAT uncollected."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

from billing_events.messages import LedgerCommand
from billing_ledger.audit import export_lines, replay_lines, verify_store
from billing_ledger.domain.invoice import Invoice
from billing_ledger.sweeper import Sweeper

from tests.unit.subscriptions.test_cancel_after_period_end import Stack, wired_stack
from tests.unit.subscriptions.test_review_credit_note_vat import books, settle

NOV_1, NOV_16, NOV_20, NOV_25 = (datetime(2026, 11, d, tzinfo=UTC) for d in (1, 16, 20, 25))
DEC_1 = datetime(2026, 12, 1, tzinfo=UTC)
CALLS = {"model": "per_unit", "unit": "USD", "unit_amount": "0.10"}
CATALOG: dict[str, Any] = {
    "meters": [{"code": "api_calls", "aggregation": "sum", "price": CALLS}],
    "plans": [{"code": "pro", "name": "Pro", "version": 1, "currency": "USD", "base_fee": "200.00",
               "charges": [{"meter": "api_calls", "price": CALLS}]}],
    "tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}],
    "seller": {"name": "Billing GmbH", "country": "DE"},
}


def usage_invoices(stack: Stack) -> list[Invoice]:
    return [i for key, i in stack.invoices().items() if key.startswith("credit-note-usage/")]


def sweep(stack: Stack, at: datetime) -> int:
    """One round of the ledger's expiry sweep (``billing serve ledger`` runs it every 5 s) at ``at``."""
    return Sweeper(stack.ledger).sweep(at)


async def cancelled_with_credit(stack: Stack) -> None:
    """A DE consumer on Pro (200.00 + 38.00 VAT, Nov 1) cancels at once on Nov 16: a credit note of 100.00 + 19.00
    VAT for the unused half, given as 119.00 of account credit; no subscription from then on."""
    stack.run("tax_profile.set", NOV_1, country="DE")
    stack.run("subscription.create", NOV_1, key="m", plan="pro")
    await settle(stack)
    stack.run("subscription.cancel", NOV_16, key="m", immediately=True)
    await settle(stack)


async def test_usage_and_a_capture_paid_with_a_cancels_credit_are_invoiced_with_their_vat_at_month_end(
        tmp_path: Path) -> None:
    """After the cancel, 800 calls (80.00 at list price) on Nov 20 and a hold captured for 20.00 on Nov 25 draw 100.00
    of the note's credit. The first sweep of December issues an invoice: 100.00 of usage (20.00 of it captured),
    "DE VAT 19 % of 100.00" 19.00, then the note's 100.00 applied after tax: 19.00 to pay. The books' tax payable is
    38.00, 19 % of the 200.00 of services the account was billed (the fee's used half, the usage), what its documents
    declare (19.00 before: the usage's VAT never charged); the 19.00 is receivable until paid; the audit is clean
    before and after the payment."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        await cancelled_with_credit(stack)
        await stack.use("u1", "800", NOV_20)
        hold = str(uuid4())
        stack.run("hold.place", NOV_25, hold_id=hold, amount="20.00", expires_at=(NOV_25 + timedelta(hours=1)
                                                                                  ).isoformat())
        stack.run("hold.capture", NOV_25, hold_id=hold, amount="20.00")
        await settle(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        assert usage_invoices(stack) == []
        sweep(stack, NOV_25 + timedelta(days=1))  # November has not ended: nothing to invoice yet
        assert usage_invoices(stack) == []
        sweep(stack, DEC_1 + timedelta(seconds=5))
        [invoice] = usage_invoices(stack)
        before_payment = books(stack)
        audit = verify_store(stack.ledger, "acme")
        sweep(stack, DEC_1 + timedelta(seconds=10))  # the next round finds nothing left to invoice
        assert len(usage_invoices(stack)) == 1
        stack.run("invoice.mark_paid", DEC_1 + timedelta(days=2), invoice_id=str(invoice.id), payment="pi_vat",
                  amount="19.00")
        paid = stack.ledger.repository.get(invoice.id)
        after_payment = books(stack)
        paid_audit = verify_store(stack.ledger, "acme")
        exported = list(export_lines(stack.ledger, "acme"))
        documents = [i for i in stack.invoices().values() if i.status != "void"]
    assert [(x["kind"], x["amount"]) for x in invoice.lines] == [
        ("usage", "100.00"), ("tax", "19.00"), ("credits_applied", "-100.00")], invoice.lines
    assert invoice.lines[0]["description"] == ("Usage in November 2026 paid with credit note credit (of it 20.00 USD "
                                               "of holds captured)")
    assert invoice.lines[1]["description"] == "DE VAT 19 % of 100.00"
    assert invoice.lines[2]["description"] == "Credit note credit applied (a payment, after tax)"
    assert (invoice.total, invoice.status, invoice.subscription_id) == (Decimal("19.00"), "finalized", None)
    assert invoice.number is not None and invoice.number.startswith("INV-2026-")
    assert (invoice.period_start, invoice.period_end) == (NOV_1, DEC_1)
    assert before_payment["tax_payable"] == Decimal("-38.00"), before_payment  # was -19.00
    assert sum((Decimal(x["amount"]) for i in documents for x in i.lines if x["kind"] == "tax"),
               Decimal(0)) == Decimal("38.00")
    # Receivable: the Nov 1 invoice (238.00, unpaid here) and this one's 19.00; its payment clears the 19.00.
    assert before_payment["receivables"] == Decimal("257.00")
    assert audit.ok, audit.problems
    assert paid.status == "paid" and after_payment["receivables"] == Decimal("238.00")
    assert after_payment.get("gateway_clearing", Decimal(0)) - before_payment.get("gateway_clearing", Decimal(0)) \
        == Decimal("19.00")
    assert paid_audit.ok, paid_audit.problems
    # The export replays clean offline; the invoice's usage line altered in the file (60.00: less usage billed than
    # the credit it applies paid) is found against the credit the account applied on it.
    replayed = replay_lines(exported)
    assert (replayed.problems, replayed.document_problems) == ([], []), replayed
    name = f"invoice {invoice.number} ({invoice.id})"
    tampered = [_rewrite(line, str(invoice.id)) for line in exported]
    found = replay_lines(tampered).document_problems
    assert f"{name} bills 60.00 USD of usage paid with credit notes' credit and applies 100.00 USD of that credit, but " \
           "the account applied 100.00 USD of it on the invoice" in found, found


def _rewrite(line: str, document: str) -> str:
    """The usage line of ``document`` as drafted in an export line, shown as 60.00 (its tax and total left alone)."""
    record = json.loads(line)
    if record["aggregate_id"] != document or record["type"] != "Invoice.LinesAdded" \
            or record["data"]["lines"][0]["kind"] != "usage":
        return line
    record["data"]["lines"][0].update(amount="60.00", exact_amount="60.00")
    return json.dumps(record, sort_keys=True)


async def test_top_up_credit_spent_without_a_subscription_is_not_invoiced_again(tmp_path: Path) -> None:
    """Credit bought (its VAT paid with the purchase) and spent on usage without a subscription: nothing to invoice
    at the month's end, as before."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        stack.run("tax_profile.set", NOV_1, country="DE")
        stack.run("credit.grant", NOV_1, unit="USD", amount="100.00", source="purchase", grant_key="bought",
                  effective_at=NOV_1.isoformat())
        await settle(stack)
        await stack.use("u1", "500", NOV_20)
        await settle(stack)
        assert all(r.outcome in ("applied", "duplicate") for r in stack.results), stack.results
        sweep(stack, DEC_1 + timedelta(seconds=5))
        assert usage_invoices(stack) == []
        assert books(stack)["tenant_wallet"] == Decimal("-50.00")  # the usage drew the purchase's credit


async def test_a_malformed_or_early_credit_note_usage_command_is_rejected_and_changes_nothing(tmp_path: Path) -> None:
    """``invoice.credit_note_usage`` (the sweep's, or anyone's on ``billing.ledger.commands``) with a ``now`` that is no
    ISO 8601 time, or later than the command was issued (November invoiced before it has ended), is rejected with a
    reason; nothing is recorded."""
    async with wired_stack(tmp_path, CATALOG) as stack:
        await cancelled_with_credit(stack)
        await stack.use("u1", "800", NOV_20)
        events = stack.ledger.process_recorder.max_notification_id()
        for now, reason in (("December", "invalid_command"), (DEC_1.isoformat(), "at_out_of_range")):
            [result] = stack.ledger.apply_commands([LedgerCommand(
                command_id=uuid4(), kind="invoice.credit_note_usage", tenant="acme", issued_at=NOV_25,
                issued_by="user:test", payload={"now": now})])
            assert (result.outcome, result.reason) == ("rejected", reason), result
        assert usage_invoices(stack) == []
        assert stack.ledger.process_recorder.max_notification_id() == events + 2  # the two rejections' receipts
