"""Session 15 review: the VAT rate on a top-up's invoice. On the real stack (namespace review15c) a German business
paying a 50.00 USD package with OFF5 got INV-2026-000003 with the tax line "USt on 45.00 8.55": the document never
says at what rate it charged VAT (EU VAT Directive art. 226(8): the rate applied is a required detail of an invoice;
the subscription invoices say "USt 19 % of 45.00"). The quote and the order record the rule's name, not its rate,
so the line carries no ``rate`` either, and the audit's "each tax line at its rate" check cannot look at it. Fixed in
session 15: the quote records the rate (``tax_rate``) and the tax line states it."""

from __future__ import annotations

import io
from decimal import Decimal

from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.checkout import Order
from billing_ledger.domain.invoice import Invoice
from billing_ledger.invoice_pdf import render_pdf
from pypdf import PdfReader

from tests.unit.payments.support import TENANT, ledger
from tests.unit.payments.test_top_up_grants import pay, place

__all__ = ["ledger"]


def test_a_top_up_invoice_states_the_vat_rate_it_charged(ledger: LedgerApplication) -> None:
    """100.00 USD of credit + 19 % DE VAT: the invoice's tax line and its PDF say 19 %."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    invoice = ledger.repository.get(Invoice.create_id(TENANT, f"orders/{order['order_id']}"))
    [tax] = [line for line in invoice.lines if line["kind"] == "tax"]
    assert tax["amount"] == "19.00"
    assert "19 %" in tax["description"], tax
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(render_pdf(invoice, issuer="billing"))).pages)
    assert "19 %" in text, text


def test_an_order_placed_before_its_quote_kept_the_rate_is_invoiced_as_before(ledger: LedgerApplication) -> None:
    """An order placed before session 15 recorded its quote without ``tax_rate``: paid now, its invoice is issued
    with the tax line it always had ("<rule> on <net>", no rate), the same 19.00 of tax."""
    fresh = place(ledger, "o1", amount="100")
    old_quote = {k: v for k, v in fresh["quote"].items() if k != "tax_rate"}
    order = Order(tenant=TENANT, key="o-old", quote=old_quote, gateway="stripe", at=utcnow(), by="user:x")
    ledger.save(order)
    pay(ledger, {"order_id": str(order.id), "key": "o-old", "quote": old_quote})
    invoice = ledger.repository.get(Invoice.create_id(TENANT, f"orders/{order.id}"))
    [tax] = [line for line in invoice.lines if line["kind"] == "tax"]
    assert (tax["amount"], tax["description"], tax.get("rate")) == ("19.00", "DE VAT on 100.00", None)
    assert invoice.total == Decimal("119.00")
