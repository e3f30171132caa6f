"""``POST/GET /v1/accounts/{t}/payment-methods``: a saved method keeps the card's brand, last four digits and expiry
as its gateway tells them (fake Stripe API), shows when it expires and whether it has; a token the gateway does not
know, card details in the request, or a gateway outage are refused with problem+json and save nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billing_ledger.application import LedgerApplication
from billing_ledger.domain.roster import roster_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.payments.support import TENANT, FakeStripe, headers, ledger, run, stripe_gateway

__all__ = ["ledger"]
URL = f"/v1/accounts/{TENANT}/payment-methods"


@pytest.fixture
def api() -> FakeStripe:
    return FakeStripe()


@pytest.fixture
def client(ledger: LedgerApplication, api: FakeStripe, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app("payment-methods-test", Settings(data_dir=tmp_path))
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing",
                                    gateways={"stripe": stripe_gateway(api)}))
    with TestClient(app) as test_client:
        yield test_client


def saved(ledger: LedgerApplication) -> list[dict[str, Any]]:
    return ledger.read(roster_id(TENANT), lambda r: [dict(m) for m in r.payment_methods]) or []


def test_a_saved_card_keeps_what_stripe_tells_and_the_api_shows_its_expiry(ledger: LedgerApplication,
                                                                           api: FakeStripe, client: TestClient) -> None:
    api.card("pm_visa", brand="visa", last4="4242", exp_month=2, exp_year=2028, customer="cus_1")
    api.card("pm_old", brand="amex", last4="0005", exp_month=1, exp_year=2020)
    assert run(ledger, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"
    created = client.post(URL, headers=headers(), json={"method_id": "pm_visa", "gateway": "stripe"})
    assert created.status_code == 201, created.text
    [visa] = created.json()["payment_methods"]
    assert visa == {"method_id": "pm_visa", "gateway": "stripe", "label": "Visa 4242",
                    "card": {"brand": "visa", "last4": "4242", "exp_month": 2, "exp_year": 2028},
                    "expires_at": "2028-03-01T00:00:00-12:00", "expired": False}
    assert ("get", "/v1/payment_methods/pm_visa") in [(c[0], c[1]) for c in api.calls]
    assert client.post(URL, headers=headers(), json={"method_id": "pm_old", "label": "Old Amex"}).status_code == 201
    listed = client.get(URL, headers=headers(role="viewer"))
    assert listed.status_code == 200
    assert [(m["method_id"], m["label"], m["expired"]) for m in listed.json()["payment_methods"]] == [
        ("pm_visa", "Visa 4242", False), ("pm_old", "Old Amex", True)]
    # The subscriptions list shows the methods the same way.
    subs = client.get(f"/v1/accounts/{TENANT}/subscriptions", headers=headers())
    assert subs.json()["payment_methods"] == listed.json()["payment_methods"]
    # Another tenant's token sees nothing of it.
    assert client.get(URL, headers=headers(role="viewer", tenant="beta")).status_code == 403


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"method_id": "pm_unknown"}, 422, "unknown-payment-method"),  # Stripe answers 404
    ({"method_id": "pm_theirs"}, 422, "unknown-payment-method"),  # another customer's card
    ({"method_id": "pm_visa", "card": {"brand": "visa", "last4": "4242", "exp_month": 12, "exp_year": 2099}},
     422, "invalid-command"),  # an expiry is the gateway's word, never the caller's
])
def test_a_method_the_gateway_does_not_vouch_for_is_refused_and_nothing_is_saved(
        ledger: LedgerApplication, api: FakeStripe, client: TestClient, body: dict[str, Any], status: int,
        kind: str) -> None:
    api.card("pm_visa", customer="cus_1")
    api.card("pm_theirs", customer="cus_someone_else")
    assert run(ledger, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"
    response = client.post(URL, headers=headers(), json=body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith(f"/{kind}")
    assert saved(ledger) == []


def test_a_gateway_outage_saves_nothing_and_says_retry(ledger: LedgerApplication, api: FakeStripe,
                                                       client: TestClient) -> None:
    api.card("pm_visa")
    original = api._handle

    def down(method: str, path: str, query: str, form: dict[str, str]) -> tuple[bytes, int]:
        if path.startswith("/v1/payment_methods/"):
            return b'{"error": {"type": "api_error", "message": "Stripe is having a bad day"}}', 500
        return original(method, path, query, form)

    api._handle = down  # type: ignore[method-assign]
    response = client.post(URL, headers=headers(), json={"method_id": "pm_visa"})
    assert response.status_code == 503, response.text
    assert response.json()["type"].endswith("/gateway-unavailable")
    assert saved(ledger) == []


def test_a_method_of_a_gateway_not_enabled_here_is_saved_without_card_details(ledger: LedgerApplication,
                                                                              client: TestClient) -> None:
    response = client.post(URL, headers=headers(), json={"method_id": "pp_token", "gateway": "paypal"})
    assert response.status_code == 201, response.text
    assert response.json()["payment_methods"] == [{"method_id": "pp_token", "gateway": "paypal", "label": "",
                                                   "card": None, "expires_at": None, "expired": False}]


def test_a_saved_stripe_card_is_marked_the_tenants_so_its_card_updates_are_attributed(
        ledger: LedgerApplication, api: FakeStripe, client: TestClient) -> None:
    """Ingest attributes Stripe's ``payment_method.(automatically_)updated`` by ``metadata.tenant`` on the method or
    its customer, which the ledger never wrote: the account updater's renewals of the cards it saved were ignored."""
    api.card("pm_visa", customer="cus_1")
    api.card("pm_loose")  # attached to no customer: Stripe updates no such method (nor does its account updater)
    for method in ("pm_visa", "pm_loose"):
        assert client.post(URL, headers=headers(), json={"method_id": method}).status_code == 201
    assert api.objects["/v1/payment_methods/pm_visa"]["metadata"] == {"tenant": TENANT}
    assert [c[3] for c in api.calls if c[0] == "post" and c[1] == "/v1/payment_methods/pm_visa"] == [
        {"metadata[tenant]": TENANT}]
    assert not [c for c in api.calls if c[0] == "post" and c[1] == "/v1/payment_methods/pm_loose"]
    assert [m["method_id"] for m in saved(ledger)] == ["pm_visa", "pm_loose"]


def test_a_stripe_card_marked_another_tenants_is_refused_and_nothing_is_saved(
        ledger: LedgerApplication, api: FakeStripe, client: TestClient) -> None:
    """Its card updates would be attributed to that tenant (and it is no card of this account's)."""
    api.card("pm_theirs", customer="cus_9", metadata={"tenant": "beta"})
    response = client.post(URL, headers=headers(), json={"method_id": "pm_theirs"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/unknown-payment-method")
    assert "another billing account's at Stripe" in response.json()["detail"]
    assert api.objects["/v1/payment_methods/pm_theirs"]["metadata"] == {"tenant": "beta"}
    assert saved(ledger) == []


def test_saving_a_method_marks_the_accounts_stripe_customer_the_tenants_too(
        ledger: LedgerApplication, api: FakeStripe, client: TestClient) -> None:
    """A customer set before session 15 was never marked: Stripe's events about it (a card saved as its source
    renewed, its deletion) named no tenant. Saving a method of it marks it."""
    api.card("pm_visa", customer="cus_1")
    assert run(ledger, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"
    assert api.objects["/v1/customers/cus_1"]["metadata"] == {}
    assert client.post(URL, headers=headers(), json={"method_id": "pm_visa"}).status_code == 201
    assert api.objects["/v1/customers/cus_1"]["metadata"] == {"tenant": TENANT}


def test_a_method_of_a_customer_stripe_marks_another_tenants_is_refused_and_nothing_is_saved(
        ledger: LedgerApplication, api: FakeStripe, client: TestClient) -> None:
    api.customer("cus_1", metadata={"tenant": "beta"})
    api.card("pm_visa", customer="cus_1")
    assert run(ledger, "payment_customer.set", TENANT, "cus", gateway="stripe", customer="cus_1").outcome == "applied"
    response = client.post(URL, headers=headers(), json={"method_id": "pm_visa"})
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("/unknown-payment-customer")
    assert api.objects["/v1/customers/cus_1"]["metadata"] == {"tenant": "beta"}
    assert api.objects["/v1/payment_methods/pm_visa"]["metadata"] == {}  # nothing marked either
    assert saved(ledger) == []
