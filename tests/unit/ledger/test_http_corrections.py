"""Adjustments and refunds over HTTP: admin/finance only, reason required, user recorded, overrides."""

from __future__ import annotations

from billing_events import ids
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.account import BillingAccount
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import apply, command, headers, open_account

U = SUBUNITS_PER_UNIT
FINANCE = headers("finance", subject="fiona@finance")
ADMIN = headers("admin", subject="ada@ops")


def account(app: LedgerApplication, tenant: str = "acme") -> BillingAccount:
    return app.read(ids.account_id(tenant), lambda a: a)  # type: ignore[return-value]


def events(app: LedgerApplication, tenant: str = "acme") -> list[object]:
    return list(app.events.get(ids.account_id(tenant)))


def spend(app: LedgerApplication, amount: int, key: str) -> None:
    [result] = apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": amount, "meter": "tokens",
                                                          "at": "2026-11-21T10:00:00+00:00"}, key=key))
    assert result.outcome == "applied"


def test_adjustment_records_user_and_reason_and_is_idempotent(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    body = {"idempotency_key": "fix-1", "amount": "2.50", "reason": "goodwill for outage"}
    first = client.post("/v1/accounts/acme/adjustments", json=body, headers=ADMIN)
    assert first.status_code == 201, first.text
    assert first.json()["user"] == "ada@ops" and first.json()["available"] == "12.50"
    again = client.post("/v1/accounts/acme/adjustments", json=body, headers=ADMIN)
    assert again.status_code == 200 and again.json() == first.json()  # the first answer, not {"duplicate": true}
    adjusted = [e for e in events(app) if type(e).__name__ == "BalanceAdjusted"]
    assert len(adjusted) == 1
    assert adjusted[0].user == "ada@ops" and adjusted[0].reason == "goodwill for outage"  # type: ignore[attr-defined]
    assert account(app).available("USD") == 1250 * U // 100


def test_a_retried_adjustment_gets_its_first_answer_after_later_movements(app: LedgerApplication,
                                                                          client: TestClient) -> None:
    """Answered ``{"duplicate": true}`` before: the caller could not tell what its adjustment did."""
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    body = {"idempotency_key": "take-1", "amount": "-4", "reason": "correction"}
    first = client.post("/v1/accounts/acme/adjustments", json=body, headers=FINANCE)
    assert first.status_code == 201, first.text
    assert (first.json()["amount"], first.json()["balance"], first.json()["available"]) == ("-4.00", "6.00", "6.00")
    spend(app, 1 * U, "spend-1")
    again = client.post("/v1/accounts/acme/adjustments", json=body, headers=ADMIN)  # another user retries it
    assert again.status_code == 200 and again.json() == first.json()
    assert again.json()["user"] == "fiona@finance"
    assert account(app).available("USD") == 5 * U  # taken once


def test_negative_adjustment_cannot_exceed_available(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    too_much = client.post("/v1/accounts/acme/adjustments", headers=FINANCE,
                           json={"idempotency_key": "take", "amount": "-10.01", "reason": "correction"})
    assert too_much.status_code == 409 and too_much.json()["reason"] == "insufficient_credit"
    assert too_much.json()["detail"] == "cannot remove 10.01 USD: only 10.00 USD is available"  # not sub-units
    ok = client.post("/v1/accounts/acme/adjustments", headers=FINANCE,
                     json={"idempotency_key": "take", "amount": "-4", "reason": "correction"})
    assert ok.status_code == 201 and ok.json()["available"] == "6.00"


def test_adjustment_needs_role_and_reason(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    body = {"idempotency_key": "x", "amount": "1", "reason": "r"}
    for role in ("service", "viewer"):
        assert client.post("/v1/accounts/acme/adjustments", json=body, headers=headers(role)).status_code == 403
    no_reason = client.post("/v1/accounts/acme/adjustments", json={"idempotency_key": "x", "amount": "1"},
                            headers=ADMIN)
    assert no_reason.status_code == 422
    zero = client.post("/v1/accounts/acme/adjustments", json={**body, "amount": "0"}, headers=ADMIN)
    assert zero.status_code == 422


def test_refund_of_unspent_purchase(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "order-1", "amount": "50.00"})
    grant = str(ids.grant_id("acme", "order-1"))
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "20.00", "reason": "customer asked"}
    refunded = client.post("/v1/accounts/acme/refunds", json=body, headers=ADMIN)
    assert refunded.status_code == 201, refunded.text
    assert refunded.json()["from_wallet"] == "20.00" and refunded.json()["from_revenue"] == "0.00"
    # What finance pays back through the gateway: this purchase had no tax booked on it.
    assert refunded.json()["paid_back"] == {"unit": "USD", "amount": "20.00", "tax": "0.00"}
    assert account(app).available("USD") == 30 * U
    again = client.post("/v1/accounts/acme/refunds", json=body, headers=ADMIN)
    assert again.status_code == 200 and again.json() == refunded.json()  # the first answer, not {"duplicate": true}
    assert account(app).available("USD") == 30 * U


def test_a_retried_refund_gets_its_first_answer_after_later_movements(app: LedgerApplication,
                                                                      client: TestClient) -> None:
    """Answered ``{"duplicate": true}`` before: finance could not tell what to pay back through the gateway."""
    open_account(app, "acme", {"key": "order-1", "amount": "50.00"})
    spend(app, 45 * U, "spend-1")
    grant = str(ids.grant_id("acme", "order-1"))
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "20.00", "reason": "dispute",
            "finance_override": True}
    first = client.post("/v1/accounts/acme/refunds", json=body, headers=FINANCE)
    assert first.status_code == 201, first.text
    assert (first.json()["from_wallet"], first.json()["from_revenue"], first.json()["paid_back"]) == (
        "5.00", "15.00", {"unit": "USD", "amount": "20.00", "tax": "0.00"})
    later = client.post("/v1/accounts/acme/refunds", headers=FINANCE,
                        json={**body, "idempotency_key": "r2", "amount": "10.00", "reason": "more"})
    assert later.status_code == 201 and later.json()["from_revenue"] == "10.00"
    # Retried by another finance user with another reason: the first refund's answer, nothing refunded again.
    again = client.post("/v1/accounts/acme/refunds", json={**body, "reason": "retry"},
                        headers=headers("finance", subject="finn@finance"))
    assert again.status_code == 200 and again.json() == first.json()
    assert again.json()["requested_by"] == "fiona@finance" and again.json()["reason"] == "dispute"
    refunds = [e for e in events(app) if type(e).__name__ == "GrantRefunded"]
    assert len(refunds) == 2 and account(app).available("USD") == 0


def test_refund_of_spent_credit_needs_finance_override(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "order-1", "amount": "50.00"})
    spend(app, 45 * U, "spend-1")
    grant = str(ids.grant_id("acme", "order-1"))
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "20.00", "reason": "dispute"}
    refused = client.post("/v1/accounts/acme/refunds", json=body, headers=ADMIN)
    assert refused.status_code == 409 and refused.json()["reason"] == "refund_exceeds_remaining"
    admin_override = client.post("/v1/accounts/acme/refunds", json={**body, "finance_override": True}, headers=ADMIN)
    assert admin_override.status_code == 403
    forced = client.post("/v1/accounts/acme/refunds", json={**body, "finance_override": True}, headers=FINANCE)
    assert forced.status_code == 201, forced.text
    assert forced.json()["from_wallet"] == "5.00" and forced.json()["from_revenue"] == "15.00"
    assert account(app).available("USD") == 0


def test_an_override_refund_is_refused_for_usage_already_given_back_as_credit(
        app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "order-1", "amount": "50.00", "expires_at": "2026-11-21T12:00:00+00:00"})
    spend(app, 50 * U, "spend-1")
    [expired] = apply(app, command("grant.expire", "acme", {"now": "2026-11-21T12:00:00+00:00"}))
    [given_back] = apply(app, command("usage.debit", "acme", {"unit": "USD", "amount_subunits": -20 * U,
                                                              "meter": "tokens", "at": "2026-11-21T13:00:00+00:00"},
                                      key="give-back-1"))
    assert expired.outcome == given_back.outcome == "applied"
    assert account(app).available("USD") == 20 * U  # usage_reversal credit
    before = len(events(app))
    grant = str(ids.grant_id("acme", "order-1"))
    body = {"idempotency_key": "r1", "grant_id": grant, "amount": "50.00", "reason": "dispute",
            "finance_override": True}
    refused = client.post("/v1/accounts/acme/refunds", json=body, headers=FINANCE)
    assert refused.status_code == 422 and refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["reason"] == "refund_exceeds_grant"
    assert "30.00" in refused.json()["detail"] and "usage_reversal" in refused.json()["detail"]
    assert len(events(app)) == before and account(app).available("USD") == 20 * U
    forced = client.post("/v1/accounts/acme/refunds", json={**body, "idempotency_key": "r2", "amount": "30.00"},
                         headers=FINANCE)
    assert forced.status_code == 201, forced.text
    assert forced.json()["from_revenue"] == "30.00" and forced.json()["paid_back"]["amount"] == "30.00"


def test_promotional_grant_is_not_refundable(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "promo", "amount": "5.00", "source": "promotion"})
    body = {"idempotency_key": "r", "grant_id": str(ids.grant_id("acme", "promo")), "amount": "1", "reason": "x"}
    response = client.post("/v1/accounts/acme/refunds", json=body, headers=FINANCE)
    assert response.status_code == 409 and response.json()["reason"] == "not_refundable"
    unknown = client.post("/v1/accounts/acme/refunds", json={**body, "grant_id": str(ids.grant_id("acme", "zz"))},
                          headers=FINANCE)
    assert unknown.status_code == 404


def test_an_adjustment_adds_credit_in_a_declared_unit_only(app: LedgerApplication, client: TestClient) -> None:
    """A ``ZZZ`` adjustment made a wallet of a unit the catalogue does not declare (docs/money.md)."""
    assert apply(app, command("catalog.publish", None, {"document": CATALOG, "digest": "c1"}))[0].outcome == "applied"
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    before = len(events(app))
    refused = client.post("/v1/accounts/acme/adjustments", headers=ADMIN,
                          json={"idempotency_key": "k", "amount": "1", "unit": "ZZZ", "reason": "t"})
    assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json")
    assert refused.json()["reason"] == "unknown_unit"
    assert len(events(app)) == before and account(app).units() == ["USD"]
    credit = client.post("/v1/accounts/acme/adjustments", headers=ADMIN,
                         json={"idempotency_key": "k2", "amount": "25", "unit": "CREDIT", "reason": "goodwill"})
    assert credit.status_code == 201 and credit.json()["available"] == "25.00"
