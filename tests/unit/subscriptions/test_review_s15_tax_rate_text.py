"""Session 15 review: the VAT rate printed on subscription invoices. On the real stack (namespace review15c) a French
customer's invoice read "TVA 2E+1 % of 92.00" (tax rule FR 0.20): the rate is printed as ``(rate * 100).normalize()``,
which Python writes in exponent notation for a whole number of tens (20 -> 2E+1, 10 -> 1E+1). An invoice must state
the VAT rate applied (EU VAT Directive art. 226(8)); 19 % prints right, the 10 % and 20 % rates of most of Europe do
not. Fixed in session 15: every rate is printed by ``percent_text``."""

from __future__ import annotations

import io

import pytest
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.domain.tax import percent_text
from billing_ledger.invoice_pdf import render_pdf
from pypdf import PdfReader

from tests.unit.subscriptions.test_subscriptions import CATALOG, NOV_1, app, invoice, open_account, run

__all__ = ["app"]

TAXED = {**CATALOG, "tax_rules": [{"region": "AT", "rate": "0.20", "name": "AT VAT"},
                                  {"region": "FR", "rate": "0.10", "name": "TVA reduite"}],
         "seller": {"name": "Billing GmbH", "country": "DE"}}


def first_invoice(app: LedgerApplication, tenant: str, country: str):  # type: ignore[no-untyped-def]
    run(app, "catalog.publish", None, document=TAXED, digest="s15-tax")
    open_account(app, tenant)
    assert run(app, "tax_profile.set", tenant, country=country, business_name="K").outcome == "applied"
    assert run(app, "subscription.create", tenant, key="m", plan="team").outcome == "applied"
    return invoice(app, tenant, f"{subscription_id(tenant, 'm')}/{NOV_1.isoformat()}")


@pytest.mark.parametrize(("tenant", "country", "expected"), [("vienna", "AT", "AT VAT 20 % of 30.00"),
                                                              ("lyon", "FR", "TVA reduite 10 % of 30.00")])
def test_an_invoice_states_a_round_vat_rate_as_a_percentage(app: LedgerApplication, tenant: str, country: str,
                                                            expected: str) -> None:
    document = first_invoice(app, tenant, country)
    [tax] = [line for line in document.lines if line["kind"] == "tax"]
    assert tax["description"] == expected


def test_the_invoice_pdf_states_the_vat_rate_as_a_percentage(app: LedgerApplication) -> None:
    document = first_invoice(app, "vienna", "AT")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(render_pdf(document, issuer="billing"))).pages)
    assert "20 % of 30.00" in text and "E+" not in text


@pytest.mark.parametrize(("rate", "expected"), [("0.20", "20"), ("0.1", "10"), ("0.19", "19"), ("0.077", "7.7"),
                                                 ("0.055", "5.5"), ("0", "0"), ("1", "100"), ("0.0000", "0")])
def test_a_rate_is_printed_in_plain_decimal_notation(rate: str, expected: str) -> None:
    assert percent_text(rate) == expected
