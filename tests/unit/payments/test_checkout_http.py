"""Checkout refusals before anything is charged (promotions, identity gate), VAT ids, and refunds end to end."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from billing_events import ids
from billing_events.messages import PaymentNotification
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.payment_profile import payment_profile_id
from billing_ledger.payment_commands import payment_command
from billing_runtime.settings import Settings

from tests.unit.payments.support import TENANT, FakeStripe, client, headers, ledger, run, stripe_gateway

__all__ = ["ledger"]
URLS = {"success_url": "https://app.test/ok", "cancel_url": "https://app.test/cancel"}


def checkout(http: Any, key: str, **body: Any) -> Any:
    return http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": key},
                     json={"gateway": "stripe", **URLS, **body})


def sessions(api: FakeStripe) -> int:
    return len([c for c in api.calls if c[1] == "/v1/checkout/sessions"])


def test_invalid_expired_and_exhausted_promotions_are_refused_before_a_session(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    for code, words in (("NOPE", "not valid"), ("OLD", "expired")):
        refused = checkout(http, f"k-{code}", package="credits-10k", promotion=code)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["type"].endswith("promotion-refused") and words in refused.json()["detail"]
        quoted = http.get(f"/v1/accounts/{TENANT}/checkout/quote", params={"amount": "10", "promotion": code},
                          headers=headers())
        assert quoted.status_code == 422
    assert checkout(http, "k-once", amount="20", promotion="ONCE").status_code == 201
    exhausted = checkout(http, "k-once-2", amount="20", promotion="ONCE")
    assert exhausted.status_code == 422 and "redeemed" in exhausted.json()["detail"]
    assert sessions(api) == 1  # only the valid order reached Stripe
    assert http.get(f"/v1/accounts/{TENANT}/orders/k-OLD", headers=headers()).status_code == 404


def test_an_unknown_gateway_and_gateway_choice(ledger: LedgerApplication) -> None:
    http = client(ledger, {"stripe": stripe_gateway(FakeStripe())})
    refused = checkout(http, "k1", amount="10", gateway="paypal")
    assert refused.status_code == 422 and refused.json()["type"].endswith("gateway-not-enabled")
    assert refused.json()["detail"] == "'paypal' is not enabled; choose one of stripe."
    # Without any gateway (the embedded default) the refusal says what to configure ("Choose one of []." before).
    bare = checkout(client(ledger, {}), "k2", amount="10", gateway=None)
    assert bare.status_code == 422 and bare.json()["reason"] == "gateway_not_enabled"
    assert "No payment gateway is enabled" in bare.json()["detail"] and "BILLING_STRIPE_API_KEY" in bare.json()["detail"]


def test_vat_ids_valid_and_invalid(ledger: LedgerApplication) -> None:
    bad = run(ledger, "tax_profile.set", TENANT, "bad", country="FR", business_name="Acme SAS", tax_id="FR00000000000")
    assert bad.outcome == "rejected" and bad.reason == "invalid_vat_id"
    # A valid French VAT id, seller in Germany: business-to-business reverse charge, no VAT on the quote.
    good = run(ledger, "tax_profile.set", TENANT, "good", country="FR", business_name="Acme SAS",
               tax_id="FR 40 303 265 045")
    assert good.outcome == "applied", good
    http = client(ledger, {"stripe": stripe_gateway(FakeStripe())})
    quote = http.get(f"/v1/accounts/{TENANT}/checkout/quote", params={"amount": "100"}, headers=headers()).json()
    assert Decimal(quote["quote"]["tax"]) == 0 and quote["quote"]["total"] == "100.00"
    assert "Reverse charge" in quote["quote"]["tax_note"]


def test_identity_gate_before_the_first_top_up(ledger: LedgerApplication) -> None:
    settings = Settings(identity_verification="first_top_up")
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)}, settings)
    refused = checkout(http, "k1", amount="10")
    assert refused.status_code == 403 and refused.json()["type"].endswith("identity_verification_required")
    assert sessions(api) == 0
    verified = http.post(f"/v1/accounts/{TENANT}/identity/verify", headers={**headers("admin", None), "Idempotency-Key": "v1"},
                         json={"reference": "kyc-123", "method": "document"})
    assert verified.status_code == 200 and verified.json()["identity_verified"]
    # A retry with the same key: the same answer (it was a 500: the duplicate command has no value).
    again = http.post(f"/v1/accounts/{TENANT}/identity/verify", headers={**headers("admin", None), "Idempotency-Key": "v1"},
                      json={"reference": "kyc-123", "method": "document"})
    assert again.status_code == 200 and again.json() == verified.json()
    assert checkout(http, "k2", amount="10").status_code == 201


def test_identity_gate_above_a_spending_threshold(ledger: LedgerApplication) -> None:
    settings = Settings(identity_verification="threshold", identity_threshold="50")
    http = client(ledger, {"stripe": stripe_gateway(FakeStripe())}, settings)
    assert checkout(http, "small", amount="20").status_code == 201  # 20 + 19 % = 23.80, under 50
    assert checkout(http, "large", amount="100").status_code == 403


def pay(ledger: LedgerApplication, api: FakeStripe, order: dict[str, Any]) -> None:
    intent = api.complete(order["checkout"]["session_id"])
    q = order["quote"]
    notification = PaymentNotification(gateway="stripe", gateway_event_id=f"evt-{order['key']}", kind="payment_succeeded",
                                       tenant=TENANT, order_id=order["order_id"], amount=Decimal(q["total"]),
                                       currency=q["currency"], verified_at=utcnow(), gateway_reference=intent)
    [result] = ledger.apply_commands([payment_command(notification)])
    assert result.outcome == "applied", result


def test_refund_request_approved_reverses_ledger_and_issues_a_credit_note(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    order = checkout(http, "o1", amount="50", promotion="BONUS500").json()
    assert order["status"] == "open", order
    request = http.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer"),
                        json={"key": "r1", "order": "o1", "reason": "bought by mistake"})
    assert request.status_code == 422 and request.json()["reason"] == "refund_not_eligible"  # not paid yet
    pay(ledger, api, order)
    request = http.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer"),
                        json={"key": "r1", "order": "o1", "reason": "bought by mistake"})
    assert request.status_code == 201, request.text
    assert http.post(f"/v1/accounts/{TENANT}/refund-requests/r1/approve",
                     headers=headers("viewer")).status_code == 403  # operators only
    assert http.post(f"/v1/accounts/{TENANT}/refund-requests/r1/approve",
                     headers=headers("finance")).status_code == 403  # not the tenant's own finance token
    approved = http.post(f"/v1/accounts/{TENANT}/refund-requests/r1/approve", headers=headers("finance", None))
    assert approved.status_code == 200, approved.text
    done = approved.json()
    assert done["status"] == "refunded" and done["gateway_refund"].startswith("re_test_")
    [(_, _, key, form)] = [c for c in api.calls if c[1] == "/v1/refunds"]
    assert key == f"refund-{done['refund_request_id']}" and form["amount"] == "5950"  # 50.00 + 19 % VAT
    assert http.get(f"/v1/accounts/{TENANT}/orders/o1", headers=headers()).json()["status"] == "refunded"

    # The ledger: the purchase refunded (credit and tax), the promotion's bonus voided; balances are zero.
    account = ledger.read(ids.account_id(TENANT), lambda a: (a.balance("USD"), a.grant_balances()))
    assert account is not None
    balance, grants = account
    assert balance == 0
    assert {g["source"]: g["status"] for g in grants} == {"purchase": "open", "promotion": "voided"}
    # The credit note mirrors the invoice.
    note = ledger.read(invoice_id(TENANT, f"orders/{order['order_id']}/refund"),
                       lambda i: (i.document_type, i.number, i.total, i.related_invoice))
    assert note is not None and note[0] == "credit_note" and note[1].startswith("CN-")
    assert note[2] == Decimal("-59.50")

    # The gateway's own refund webhook that follows changes nothing.
    notification = PaymentNotification(gateway="stripe", gateway_event_id="evt-refund", kind="refund_succeeded",
                                       tenant=TENANT, order_id=order["order_id"], amount=Decimal("59.50"),
                                       currency="USD", verified_at=utcnow(), gateway_reference=done["gateway_refund"])
    [result] = ledger.apply_commands([payment_command(notification)])
    assert result.outcome == "applied" and result.value["already_refunded"]
    again = http.post(f"/v1/accounts/{TENANT}/refund-requests/r1/approve", headers=headers("finance", None))
    assert again.status_code == 422 and again.json()["reason"] == "refund_not_eligible"


def test_a_gateway_customer_without_a_customer_id_is_refused_and_changes_nothing(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    api.customer("cus_1")
    api.customer("cus_2")
    http = client(ledger, {"stripe": stripe_gateway(api)})
    url = f"/v1/accounts/{TENANT}/gateway-customers/stripe"
    profile = payment_profile_id(TENANT)
    assert http.put(url, headers=headers("admin", None), json={"customer": "cus_1"}).status_code == 200
    for body in ({}, {"customer": None}, {"customer": ""}, {"customer": 42}, {"customer": ["cus_2"]}):
        refused = http.put(url, headers=headers("admin", None), json=body)
        assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json"), body
        assert refused.json()["reason"] == "invalid_command" and "customer" in refused.json()["detail"]
        # Was stored as "None" / "42": charges of saved methods (auto-top-up, dunning) named that customer.
        assert ledger.read(profile, lambda p: dict(p.customers)) == {"stripe": "cus_1"}, body
    assert http.put(url, headers=headers("admin", None), json={"customer": "cus_2"}).json()["customer"] == "cus_2"
    assert ledger.read(profile, lambda p: dict(p.customers)) == {"stripe": "cus_2"}


def test_the_accounts_gateway_customer_is_marked_the_tenants_so_stripes_events_about_it_are_attributed(
        ledger: LedgerApplication) -> None:
    """Ingest attributes Stripe's events about a customer (``customer.source.updated``, ``customer.deleted``) by its
    ``metadata.tenant``, which the ledger wrote only on PaymentMethods: they named no tenant."""
    api = FakeStripe()
    api.customer("cus_1")
    http = client(ledger, {"stripe": stripe_gateway(api)})
    url = f"/v1/accounts/{TENANT}/gateway-customers/stripe"
    assert http.put(url, headers=headers("admin", None), json={"customer": "cus_1"}).status_code == 200
    assert api.objects["/v1/customers/cus_1"]["metadata"] == {"tenant": TENANT}
    assert http.put(url, headers=headers("admin", None), json={"customer": "cus_1"}).status_code == 200  # again
    assert [c[3] for c in api.calls if c[0] == "post" and c[1] == "/v1/customers/cus_1"] == [
        {"metadata[tenant]": TENANT}]  # marked once


@pytest.mark.parametrize(("customer", "detail"), [
    ("cus_unknown", "does not know customer cus_unknown"),  # Stripe answers 404
    ("cus_theirs", "another billing account's"),  # its events would reach that tenant
    ("cus_gone", "is deleted"),
])
def test_a_gateway_customer_stripe_does_not_vouch_for_is_refused_and_nothing_is_stored(
        ledger: LedgerApplication, customer: str, detail: str) -> None:
    api = FakeStripe()
    api.customer("cus_theirs", metadata={"tenant": "beta"})
    api.customer("cus_gone")
    api.delete_customer("cus_gone")
    http = client(ledger, {"stripe": stripe_gateway(api)})
    refused = http.put(f"/v1/accounts/{TENANT}/gateway-customers/stripe", headers=headers("admin", None),
                       json={"customer": customer})
    assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json"), refused.text
    assert refused.json()["type"].endswith("/unknown-payment-customer") and detail in refused.json()["detail"]
    assert ledger.read(payment_profile_id(TENANT), lambda p: dict(p.customers)) in (None, {})
    assert api.objects["/v1/customers/cus_theirs"]["metadata"] == {"tenant": "beta"}


def test_checkout_and_refund_request_fields_of_the_wrong_type_are_refused(ledger: LedgerApplication) -> None:
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    for urls in ({**URLS, "success_url": 5}, {**URLS, "cancel_url": ["https://app.test/x"]}):
        refused = http.post(f"/v1/accounts/{TENANT}/checkout", headers={**headers(), "Idempotency-Key": "k-bad"},
                            json={"gateway": "stripe", "amount": "10", **urls})
        assert refused.status_code == 422 and refused.json()["type"].endswith("invalid-request"), refused.text
    assert sessions(api) == 0 and http.get(f"/v1/accounts/{TENANT}/orders/k-bad", headers=headers()).status_code == 404
    for body in ({"key": 7, "order": "o1"}, {"key": "r1", "order": "o1", "reason": None}):
        refused = http.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer"), json=body)
        assert refused.status_code == 422, refused.text
    assert http.get(f"/v1/accounts/{TENANT}/refund-requests/r1", headers=headers()).status_code == 404
    assert http.get(f"/v1/accounts/{TENANT}/refund-requests/7", headers=headers()).status_code == 404


def test_an_order_or_refund_request_key_no_path_can_address_is_refused(ledger: LedgerApplication) -> None:
    """An order's key (its Idempotency-Key) is read back at ``.../orders/{key}``, a refund request's at
    ``.../refund-requests/{key}``: one with a ``/`` was placed, and never found again (404)."""
    api = FakeStripe()
    http = client(ledger, {"stripe": stripe_gateway(api)})
    refused = checkout(http, "o/1", amount="50")
    assert (refused.status_code, refused.json()["type"].rsplit("/", 1)[1]) == (422, "invalid-request"), refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert sessions(api) == 0  # refused before the order is placed: the gateway was never asked
    order = checkout(http, "o1", amount="50").json()
    pay(ledger, api, order)
    bad = http.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer"),
                    json={"key": "r/1", "order": "o1", "reason": "bought by mistake"})
    assert (bad.status_code, bad.json()["reason"]) == (422, "invalid_refund_request"), bad.text
    good = http.post(f"/v1/accounts/{TENANT}/refund-requests", headers=headers("viewer"),
                     json={"key": "r1", "order": "o1", "reason": "bought by mistake"})
    assert good.status_code == 201, good.text
    assert http.get(f"/v1/accounts/{TENANT}/refund-requests/r1", headers=headers()).json()["status"] == "requested"
