"""Session 15 review: a client retrying a ledger request with the same ``Idempotency-Key`` (a timeout, a lost
answer) must get the first answer again, as the holds, adjustments and refunds routes give it (docs/ledger.md). On the
real stack (namespace review15b) the subscription routes answered a retry with what the duplicate command returned,
nothing: ``PUT /v1/workspaces/{w}/accounts/{t}`` a 500 in plain text (no problem+json), ``PUT .../tax-profile`` 200
with ``tax_profile: null``, ``POST .../subscriptions/{key}/change`` 200 with ``result: null`` (the prorated lines the
client came for are lost). Fixed in session 15: a retry is answered from what the first request left (the workspace,
the profile, the document the change issued)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.subscriptions.test_subscriptions import CATALOG, open_account, run

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(ledger, "catalog.publish", None, document=CATALOG, digest="s15-1").outcome == "applied"
    open_account(ledger, "acme")
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    yield TestClient(api, raise_server_exceptions=False)
    ledger.close()


def twice(client: TestClient, method: str, url: str, body: object | None, key: str) -> tuple[object, object]:
    headers = {**ADMIN, "Idempotency-Key": key}
    first = client.request(method, url, json=body, headers=headers)
    again = client.request(method, url, json=body, headers=headers)
    return (first.status_code, first.json()), (again.status_code,
                                               again.json() if "json" in again.headers.get("content-type", "")
                                               else again.text)


def test_a_retried_workspace_membership_gets_the_first_answer(client: TestClient) -> None:
    first, again = twice(client, "PUT", "/v1/workspaces/acme-corp/accounts/acme", None, "join-1")
    assert first == (200, {"workspace": "acme-corp", "accounts": ["acme"]})
    assert again == first


def test_a_retried_tax_profile_gets_the_profile_it_saved(client: TestClient) -> None:
    profile = {"country": "US", "subdivision": "CA", "business_name": "Acme Inc"}
    first, again = twice(client, "PUT", "/v1/accounts/acme/tax-profile", profile, "profile-1")
    assert first[0] == 200 and first[1]["tax_profile"]["business_name"] == "Acme Inc"  # type: ignore[index]
    assert again == first


def test_a_retried_quantity_change_gets_its_prorated_lines_again(client: TestClient) -> None:
    created = client.post("/v1/accounts/acme/subscriptions", headers=ADMIN, json={"key": "main", "plan": "team"})
    assert created.status_code == 201, created.text
    first, again = twice(client, "POST", "/v1/accounts/acme/subscriptions/main/change", {"quantity": 2}, "seats-2")
    assert first[0] == 200 and first[1]["quantity"] == 2  # type: ignore[index]
    lines = first[1]["result"]["lines"]  # type: ignore[index]
    assert [line["kind"] for line in lines] == ["proration", "proration"]
    assert again[0] == 200 and again[1]["result"] == first[1]["result"]  # type: ignore[index]


def test_a_retried_immediate_cancel_gets_its_credit_lines_again(client: TestClient) -> None:
    created = client.post("/v1/accounts/acme/subscriptions", headers=ADMIN,
                          json={"key": "main", "plan": "team", "trial": False})
    assert created.status_code == 201, created.text
    first, again = twice(client, "POST", "/v1/accounts/acme/subscriptions/main/cancel", {"immediately": True},
                         "cancel-1")
    assert first[0] == 200 and first[1]["status"] == "canceled"  # type: ignore[index]
    assert [line["kind"] for line in first[1]["result"]["lines"]] == ["proration"]  # type: ignore[index]
    assert again == first


def test_a_retry_of_a_refused_request_is_refused_again(client: TestClient) -> None:
    first, again = twice(client, "POST", "/v1/accounts/acme/subscriptions/nope/change", {"quantity": 2}, "none-1")
    assert first[0] == 404 and again == first
