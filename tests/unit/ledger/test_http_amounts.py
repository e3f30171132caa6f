"""Amounts in request bodies are decimal strings of ASCII digits (billing_events.money.parse_decimal): other scripts'
digits and surrounding spaces are a 422 problem+json that changes nothing, on the hold route (lean handler and its
FastAPI reference) as on the corrections."""

from __future__ import annotations

import pytest
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import headers, open_account

ADMIN = headers("admin", subject="ada@ops")
NOT_DECIMALS = ["١٢", "１２", " 12 ", "12\n", "+12", ".5", "12."]


def recorded(app: LedgerApplication) -> int:
    return len(list(app.events.get(ids.account_id("acme"))))


def available(app: LedgerApplication) -> int:
    return app.read(ids.account_id("acme"), lambda a: a.available("USD"))  # type: ignore[no-any-return]


@pytest.mark.parametrize("amount", NOT_DECIMALS)
def test_an_amount_that_is_not_a_plain_decimal_is_refused_and_changes_nothing(
        app: LedgerApplication, client: TestClient, amount: str) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    before = recorded(app)
    for path, body in (("/v1/accounts/acme/adjustments", {"idempotency_key": "a", "amount": amount, "reason": "r"}),
                       ("/v1/accounts/acme/holds", {"idempotency_key": "h", "amount": amount})):
        response = client.post(path, json=body, headers=ADMIN)
        assert response.status_code == 422, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert "decimal" in response.text
    assert recorded(app) == before
    assert available(app) == 100 * SUBUNITS_PER_UNIT


def test_plain_decimals_and_str_decimal_exponents_are_still_amounts(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    for key, amount in (("a", "12"), ("b", "-2.50"), ("c", "1E+1")):
        response = client.post("/v1/accounts/acme/adjustments", headers=ADMIN,
                               json={"idempotency_key": key, "amount": amount, "reason": "r"})
        assert response.status_code == 201, response.text
    assert response.json()["available"] == "119.50"
