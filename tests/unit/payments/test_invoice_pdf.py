"""The invoice PDF: the emailed copy and a download (`GET /v1/accounts/{t}/invoices/{id}.pdf`) are the same
document, with its issue and due dates, the customer and the seller as they were when it was finalized."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger import subscriptions_http
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import INVOICE, Invoice, line
from billing_ledger.invoice_pdf import render_pdf
from billing_ledger.notifier import SmtpSettings, send_pending
from billing_ledger.payment_commands import payment_command
from billing_ledger.subscriptions_http import build_router
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from fastapi.testclient import TestClient
from pypdf import PdfReader

from tests.support import Inbox
from tests.unit.payments.support import SETTINGS, command, headers, run

__all__: list[str] = []
TENANT = "acme"
SELLER = {"name": "Billing GmbH", "country": "DE", "vat_id": "DE 136 695 976"}
CATALOG = {"tax_rules": [{"region": "DE", "rate": "0.19", "name": "DE VAT"}], "packages": [], "seller": SELLER,
           "meters": [{"code": "api_calls"}]}  # a catalogue publishes something (billing_events.catalog.nothing_to_publish)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    app.invoice_issuer = "Billing GmbH"  # type: ignore[attr-defined]  # as billing_ledger.app sets it from settings
    assert run(app, "catalog.publish", None, document=CATALOG, digest="pdf1").outcome == "applied"
    assert run(app, "account.open", TENANT, currency="EUR").outcome == "applied"
    yield app
    app.close()


def text_of(pdf: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)


def paid_top_up(ledger: LedgerApplication, key: str) -> Invoice:
    [placed] = ledger.apply_commands([command("checkout.place", TENANT, {"key": key, "gateway": "stripe",
                                                                        "amount": "100"})])
    assert placed.outcome == "applied", placed
    order, quote = placed.value["order_id"], placed.value["quote"]
    paid = ledger.apply_commands([payment_command(PaymentNotification(
        gateway="stripe", gateway_event_id=f"evt-{key}", kind="payment_succeeded", tenant=TENANT, order_id=order,
        amount=Decimal(quote["total"]), currency="EUR", verified_at=utcnow(), gateway_reference=f"pi-{key}"))])
    assert paid[0].outcome == "applied", paid
    return ledger.repository.get(Invoice.create_id(TENANT, f"orders/{order}"))


def test_the_downloaded_pdf_is_the_emailed_one_with_dates_customer_and_seller(
        ledger: LedgerApplication, smtp: tuple[Inbox, int], tmp_path: Path) -> None:
    assert run(ledger, "tax_profile.set", TENANT, country="FR", business_name="Acme SAS",
               tax_id="FR40303265045").outcome == "applied"
    invoice = paid_top_up(ledger, "o1")
    inbox, port = smtp
    assert send_pending(ledger, SmtpSettings("127.0.0.1", port, "invoices@billing.test", "Billing GmbH")) == 1
    [message] = inbox.messages
    [attachment] = [part for part in message.walk() if part.get_content_type() == "application/pdf"]
    emailed = text_of(attachment.get_payload(decode=True))
    # The customer renames the business and moves afterwards: the issued invoice keeps what it was issued to.
    assert run(ledger, "tax_profile.set", TENANT, country="DE", business_name="Renamed GmbH").outcome == "applied"

    api = create_app("ledger-pdf-test", SETTINGS)
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    response = TestClient(api).get(f"/v1/accounts/{TENANT}/invoices/{invoice.id}.pdf", headers=headers(tenant=TENANT))
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
    downloaded = text_of(response.content)

    assert downloaded == emailed
    assert invoice.issued_at is not None and invoice.due_at is not None
    for expected in (invoice.number, "Issue date (ISO 8601)", invoice.issued_at.isoformat(), "Due date (ISO 8601)",
                     invoice.due_at.isoformat(), "Billed to", "Acme SAS", "Customer country (ISO 3166)", "FR",
                     "Customer VAT id", "FR40303265045", "Customer account", TENANT,
                     "Issuer", "Billing GmbH", "Issuer VAT id", "DE136695976", "Total", "100.00"):
        assert str(expected) in downloaded, expected
    assert "Renamed GmbH" not in downloaded


def test_a_consumer_without_business_name_is_billed_by_account_and_country(ledger: LedgerApplication) -> None:
    assert run(ledger, "tax_profile.set", TENANT, country="DE").outcome == "applied"
    invoice = paid_top_up(ledger, "o2")
    text = text_of(render_pdf(invoice, issuer="ignored"))
    assert "Billed to\nacme" in text and "Customer country (ISO 3166)\nDE" in text and "Customer VAT id" not in text
    assert "Billing GmbH" in text and "ignored" not in text and "19.00" in text


def test_an_invoice_finalized_before_it_recorded_customer_and_seller_still_renders_with_its_dates() -> None:
    at = datetime(2026, 11, 1, tzinfo=UTC)
    invoice = Invoice(tenant="acme", key="k", document_type=INVOICE, currency="USD",
                      lines=[line("top_up", "Top-up", Decimal("10.00"), "USD")], period_start=None, period_end=None,
                      subscription_id=None, related_invoice=None, at=at, by="user:test")
    invoice.finalize(number="INV-2026-000009", issued_at=at, due_at=at.replace(day=15), by="user:test")  # as before
    text = text_of(render_pdf(invoice, issuer="Billing GmbH"))
    assert "Billed to\nacme" in text and "Issuer\nBilling GmbH" in text
    assert "2026-11-01T00:00:00+00:00" in text and "2026-11-15T00:00:00+00:00" in text


def test_another_tenants_invoice_is_refused_without_being_rendered(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for under another tenant's path, an invoice is 404 and never rendered: before, the route rendered the
    whole PDF and only then compared its tenant (a rendering for any stranger's request, and its time told that the
    invoice exists)."""
    assert run(ledger, "account.open", "globex", currency="EUR").outcome == "applied"
    invoice = paid_top_up(ledger, "o3")
    rendered: list[str] = []

    def rendering(document: Invoice, *, issuer: str) -> bytes:  # the real renderer, watched
        rendered.append(document.tenant)
        return render_pdf(document, issuer=issuer)

    monkeypatch.setattr(subscriptions_http, "render_pdf", rendering)
    api = create_app("ledger-pdf-test", SETTINGS)
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    http = TestClient(api)
    for token in (headers(tenant="globex"), headers(tenant=None)):  # globex's own token, and a platform admin's
        response = http.get(f"/v1/accounts/globex/invoices/{invoice.id}.pdf", headers=token)
        assert response.status_code == 404 and response.json()["type"].endswith("/unknown-invoice")
    assert rendered == []
    owner = http.get(f"/v1/accounts/{TENANT}/invoices/{invoice.id}.pdf", headers=headers(tenant=TENANT))
    assert owner.status_code == 200 and invoice.number in text_of(owner.content)
    assert rendered == [TENANT]
