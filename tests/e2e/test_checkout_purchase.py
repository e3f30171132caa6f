"""The full top-up purchase, offline: quote, checkout (Stripe SDK over a fake ``stripe.HTTPClient``), the
customer pays on the hosted page, a webhook signed with the SDK's helper goes through ingest (signature,
re-fetch, PaymentNotification), the ledger credits once and issues the invoice with tax and promotion, and
the notifier emails it with its PDF over SMTP (aiosmtpd)."""

from __future__ import annotations

import io
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
from billing_events import ids, topics
from billing_events.messages import PaymentNotification
from billing_events.money import to_subunits
from billing_ingest.webhooks import stripe as ingest_stripe
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import account_events
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.postings import account_balances
from billing_ledger.notifier import SmtpSettings, send_pending
from billing_ledger.payment_commands import payment_command
from billing_runtime.settings import Settings
from pypdf import PdfReader

from tests.support import Inbox
from tests.unit.ingest.harness import Ingest
from tests.unit.payments.support import (
    CATALOG,
    TENANT,
    FakeStripe,
    client,
    headers,
    ledger,
    run,
    stripe_gateway,
)

__all__ = ["ledger"]
SECRET = "whsec_test_checkout"


def signed_event(event_type: str, obj: dict[str, Any], event_id: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"id": event_id, "object": "event", "type": event_type, "created": int(time.time()),
                       "data": {"object": obj}})
    header = stripe.WebhookSignature.generate_signature_header(body, SECRET)
    return body.encode(), {"Stripe-Signature": header, "Content-Type": "application/json"}


async def through_ingest(tmp_path: Path, api: FakeStripe, *events: tuple[bytes, dict[str, str]]
                         ) -> list[PaymentNotification]:
    gateway = ingest_stripe.build(Settings(stripe_api_key="sk_test_123", stripe_webhook_secret=SECRET),
                                  http_client=api)
    assert gateway is not None
    ingest = await Ingest(tmp_path / "ingest", {"stripe": gateway}).start()
    try:
        for body, signed in events:
            response = await ingest.http.post("/v1/webhooks/stripe", content=body, headers=signed)
            assert response.status_code in (200, 409), response.text
        return [PaymentNotification.model_validate(p) for p in await ingest.published(topics.PAYMENTS)]
    finally:
        await ingest.stop()


@pytest.mark.asyncio
async def test_a_package_purchase_end_to_end(tmp_path: Path, ledger: LedgerApplication,
                                             smtp: tuple[Inbox, int]) -> None:
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})

    quote = http.get(f"/v1/accounts/{TENANT}/checkout/quote", params={"package": "credits-10k", "promotion": "TENOFF"},
                     headers=headers()).json()["quote"]
    assert (quote["amount"], quote["discount"], quote["tax"], quote["total"]) == ("95.00", "9.50", "16.25", "101.75")
    assert (quote["credits"], quote["bonus_credits"]) == ("10000", "1000")

    placed = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": "order-1"},
                       json={"package": "credits-10k", "promotion": "TENOFF", "gateway": "stripe",
                             "success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"})
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert order["status"] == "open" and order["checkout_url"].startswith("https://checkout.stripe.test/")
    [(method, _path, key, form)] = [c for c in api.calls if c[1] == "/v1/checkout/sessions"]
    assert (method, key) == ("post", f"checkout-{order['order_id']}")
    assert form["mode"] == "payment" and form["line_items[0][price_data][unit_amount]"] == "10175"
    assert (form["metadata[tenant]"], form["metadata[order_id]"]) == (TENANT, order["order_id"])

    # A retried request (same Idempotency-Key) is the same order and the same page: no second session.
    again = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": "order-1"},
                      json={"package": "credits-10k", "promotion": "TENOFF", "gateway": "stripe",
                            "success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"})
    assert again.json()["checkout_url"] == order["checkout_url"]
    assert len([c for c in api.calls if c[1] == "/v1/checkout/sessions"]) == 1

    session_id = order["checkout"]["session_id"]
    api.complete(session_id)
    obj = {"id": session_id, "object": "checkout.session"}
    notifications = await through_ingest(
        tmp_path, api, signed_event("checkout.session.completed", obj, "evt_1"),
        signed_event("checkout.session.completed", obj, "evt_1"),  # a replay: refused by ingest
        signed_event("checkout.session.async_payment_succeeded", obj, "evt_2"))  # same movement: not re-published
    assert len(notifications) == 1 and notifications[0].order_id == order["order_id"]

    command = payment_command(notifications[0])
    [first] = ledger.apply_commands([command])
    assert first.outcome == "applied", first
    [second] = ledger.apply_commands([command])
    assert second.outcome == "duplicate"
    # Even another notification of the same payment (another event id) does not credit twice.
    other = payment_command(notifications[0].model_copy(update={"gateway_event_id": "evt_other"}))
    [third] = ledger.apply_commands([other])
    assert third.outcome == "applied" and third.value["already_paid"]

    status = http.get(f"/v1/accounts/{TENANT}/orders/order-1", headers=headers("viewer")).json()
    assert status["status"] == "paid" and status["invoice_id"]

    grants = ledger.read(ids.account_id(TENANT), lambda a: a.grant_balances())
    assert grants is not None
    purchased = [(g["source"], g["unit"], g["amount"]) for g in grants]
    assert purchased == [("purchase", "CREDIT", 11000 * 10**9)]

    invoice = ledger.read(invoice_id(TENANT, f"orders/{order['order_id']}"),
                          lambda i: (i.status, i.number, [(x["kind"], x["amount"]) for x in i.lines], i.total))
    assert invoice is not None
    inv_status, number, lines, total = invoice
    assert inv_status == "paid" and number and number.startswith("INV-")
    assert lines == [("top_up", "95.00"), ("discount", "-9.50"), ("tax", "16.25")]
    assert total == Decimal("101.75")

    inbox, port = smtp
    assert send_pending(ledger, SmtpSettings("127.0.0.1", port, "billing@localhost", "billing")) == 1
    [mail] = inbox.messages
    assert number in mail["Subject"]
    [pdf] = [p for p in mail.walk() if p.get_content_type() == "application/pdf"]
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.get_payload(decode=True))).pages)
    assert number in text and "101.75" in text and "16.25" in text


@pytest.mark.asyncio
async def test_a_three_decimal_currency_purchase_end_to_end(tmp_path: Path, ledger: LedgerApplication) -> None:
    """A KWD package of 12.340 with 5 % tax: the quote's total was 12.957, which Stripe refuses (a three-decimal
    amount's last digit must be 0), so the checkout failed. Billed in hundredths it is 12.960: the hosted page, the
    webhook through ingest and the ledger's books all carry 12.960 KWD."""
    kwd = {"code": "kwd-12", "name": "12.340 KWD of credit", "unit": "KWD", "credits": "12.340", "price": "12.340",
           "currency": "KWD"}
    document = {**CATALOG, "packages": [*CATALOG["packages"], kwd],
                "tax_rules": [*CATALOG["tax_rules"], {"region": "OM", "rate": "0.05", "name": "OM VAT"}]}
    assert run(ledger, "catalog.publish", None, document=document, digest="pay-kwd").outcome == "applied"
    assert run(ledger, "account.open", "gulf", currency="KWD").outcome == "applied"
    assert run(ledger, "tax_profile.set", "gulf", country="OM", business_name="Gulf LLC").outcome == "applied"
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    placed = http.post("/v1/accounts/gulf/checkout", headers={**headers(tenant="gulf"), "Idempotency-Key": "kwd-1"},
                       json={"package": "kwd-12", "success_url": "https://app.test/ok",
                             "cancel_url": "https://app.test/cancel"})
    assert placed.status_code == 201, placed.text
    order = placed.json()
    assert (order["quote"]["tax"], order["quote"]["total"]) == ("0.620", "12.960")

    session_id = order["checkout"]["session_id"]
    api.complete(session_id)
    [notification] = await through_ingest(tmp_path, api, signed_event(
        "checkout.session.completed", {"id": session_id, "object": "checkout.session"}, "evt_kwd"))
    assert (notification.amount, notification.currency) == (Decimal("12.960"), "KWD")
    [paid] = ledger.apply_commands([payment_command(notification)])
    assert paid.outcome == "applied", paid

    postings = [p for e in account_events(ledger, "gulf") for p in getattr(e, "postings", None) or []]
    assert {k: v for k, v in account_balances(postings).items() if v} == {
        ("gateway_clearing", "KWD"): to_subunits(Decimal("12.960")), ("tax_payable", "KWD"): -to_subunits(Decimal("0.620")),
        ("tenant_wallet", "KWD"): -to_subunits(Decimal("12.340"))}
    invoice = ledger.read(invoice_id("gulf", f"orders/{order['order_id']}"),
                          lambda i: [(x["kind"], x["amount"]) for x in i.lines])
    assert invoice == [("top_up", "12.340"), ("tax", "0.620")]
