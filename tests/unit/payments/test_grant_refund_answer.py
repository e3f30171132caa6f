"""``POST /v1/accounts/{tenant}/refunds`` names the credit note it issued (session 15): finance pays back through the
gateway what the answer says and files the document it names. Session 14 made a refund of a checkout order's purchase
grant issue a ``CN-`` credit note, but the answer (and its retry's) did not say which one."""

from __future__ import annotations

from billing_events import ids
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.invoice import CREDIT_NOTE, invoice_id
from billing_ledger.http import build_router
from billing_runtime.http import create_app
from fastapi.testclient import TestClient

from tests.unit.payments.support import SETTINGS, TENANT, headers, ledger, run
from tests.unit.payments.test_top_up_grants import pay, place

__all__ = ["ledger"]
FINANCE = headers("finance", tenant=None)


def corrections(app: LedgerApplication) -> TestClient:
    api = create_app("ledger-refunds-test", SETTINGS)
    api.include_router(build_router(app))
    return TestClient(api)


def test_the_refund_of_a_top_up_names_its_credit_note_in_the_answer_and_its_retry(ledger: LedgerApplication) -> None:
    """25.00 of a 100.00 + 19 % top-up refunded: the answer pays back 29.75 (4.75 VAT) and names CN-2026-000001, the
    credit note of -29.75 it issued, by id and number; a retry (200) names the same note and issues no other."""
    order = place(ledger, "o1", amount="100")
    pay(ledger, order)
    grant = str(ids.grant_id(TENANT, f"order/{order['order_id']}/purchase"))
    http = corrections(ledger)
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "25.00", "reason": "partial refund"}
    first = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=FINANCE)
    assert first.status_code == 201, first.text
    assert first.json()["paid_back"] == {"unit": "USD", "amount": "29.75", "tax": "4.75"}
    note = first.json()["credit_note"]
    assert note is not None and note["number"] == "CN-2026-000001", first.json()
    stored = ledger.repository.get(invoice_id(TENANT, f"orders/{order['order_id']}/refunds/"
                                                      f"{first.json()['refund_id']}"))
    assert (str(stored.id), stored.number, stored.document_type, str(stored.total)) == (
        note["id"], "CN-2026-000001", CREDIT_NOTE, "-29.75")
    again = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=FINANCE)
    assert again.status_code == 200 and again.json() == first.json()
    second = http.post(f"/v1/accounts/{TENANT}/refunds", json={**body, "idempotency_key": "r2", "amount": "10.00"},
                       headers=FINANCE)
    assert second.status_code == 201 and second.json()["credit_note"]["number"] == "CN-2026-000002"


def test_a_refund_without_a_document_answers_a_null_credit_note(ledger: LedgerApplication) -> None:
    """A grant that is no checkout order's (a manual purchase grant) is refunded without a credit note: ``null``, on the
    first answer and on its retry."""
    assert run(ledger, "credit.grant", TENANT, "g1", unit="USD", amount="50.00", source="purchase",
               grant_key="manual-1", effective_at="2020-01-01T00:00:00+00:00").outcome == "applied"
    http = corrections(ledger)
    body = {"idempotency_key": "r1", "grant_id": str(ids.grant_id(TENANT, "manual-1")), "amount": "20.00",
            "reason": "customer asked"}
    first = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=FINANCE)
    assert first.status_code == 201, first.text
    assert "credit_note" in first.json() and first.json()["credit_note"] is None
    again = http.post(f"/v1/accounts/{TENANT}/refunds", json=body, headers=FINANCE)
    assert again.status_code == 200 and again.json() == first.json()
