"""Session 15 review: a request body field the route does not know is dropped without a word on the subscription
routes, so a client's typo changes what is bought or when it ends. On the real stack (namespace review15c):
``POST .../subscriptions {"key": "a", "plan": "mini", "quantitty": 3}`` created a subscription of quantity 1 (201),
``POST .../subscriptions/a/cancel {"immediate": true}`` scheduled the cancel at the period's end (200,
``cancel_at_period_end: true``). The holds and auto-top-up routes refuse an unknown field (422 problem+json naming
it); "bad input always gets a clear error and changes nothing". Fixed in session 15: the models forbid extra fields
(``extra="forbid"``) and ``described_by`` refuses them."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.unit.subscriptions.test_review_s15_idempotent_retries import ADMIN, client

__all__ = ["client"]


def test_a_subscription_with_a_misspelt_field_is_refused_and_not_created(client: TestClient) -> None:
    response = client.post("/v1/accounts/acme/subscriptions", headers=ADMIN,
                           json={"key": "main", "plan": "team", "quantitty": 3})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "quantitty" in response.text
    assert client.get("/v1/accounts/acme/subscriptions/main", headers=ADMIN).status_code == 404


def test_a_cancel_with_a_misspelt_field_is_refused_and_changes_nothing(client: TestClient) -> None:
    assert client.post("/v1/accounts/acme/subscriptions", headers=ADMIN,
                       json={"key": "main", "plan": "team"}).status_code == 201
    response = client.post("/v1/accounts/acme/subscriptions/main/cancel", headers=ADMIN, json={"immediate": True})
    assert response.status_code == 422, response.text
    assert "immediate" in response.text
    after = client.get("/v1/accounts/acme/subscriptions/main", headers=ADMIN).json()
    assert (after["status"], after["cancel_at_period_end"]) == ("active", False)
