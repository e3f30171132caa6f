"""The request bodies of the subscription (and top-up settings) routes: described by typed models in the OpenAPI
document, their examples accepted, and bad bodies refused with the same problem+json as before (SQLite ledger)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.timeutil import utcnow
from billing_ledger import http_models
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.roster import roster_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient
from pydantic import BaseModel

from tests.unit.subscriptions.test_subscriptions import run

DOCS = Path(__file__).resolve().parents[3] / "docs"
URL = "/v1/accounts/acme/subscriptions"
ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="bodies-1").outcome == "applied"
    assert run(app, "account.open", "acme", currency="USD").outcome == "applied"
    yield app
    app.close()


@pytest.fixture
def client(ledger: LedgerApplication, tmp_path: Path) -> TestClient:
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    return TestClient(api)


def example(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_json_schema()["examples"][0])


def live(ledger: LedgerApplication) -> list[str]:
    return ledger.read(roster_id("acme"), lambda r: list(r.live)) or []


def test_the_documented_example_subscribes_and_bills_what_it_says(ledger: LedgerApplication,
                                                                  client: TestClient) -> None:
    body = example(http_models.SubscriptionCreate)
    created = client.post(URL, headers=ADMIN, json=body)
    assert created.status_code == 201, created.text
    view = created.json()
    # charge_before_access: incomplete until its first invoice (3 x 49.00) is paid; periods turn in Berlin.
    assert (view["status"], view["quantity"], view["collection"], view["time_zone"]) == (
        "incomplete", 3, "charge_before_access", "Europe/Berlin")
    sub = subscription_id("acme", "main")
    start = ledger.read(sub, lambda s: s.period_start)
    invoice = ledger.repository.get(invoice_id("acme", f"{sub}/{start.isoformat()}"))
    assert (invoice.status, invoice.total, invoice.currency) == ("finalized", Decimal("147.00"), "USD")


@pytest.mark.parametrize(("body", "status", "kind"), [
    ({"key": "main"}, 422, "invalid-request"),                                        # plan missing
    ({"plan": "starter"}, 422, "invalid-request"),                                    # key missing
    ({"key": "main", "plan": "starter", "quantity": "three"}, 422, "invalid-command"),  # not an integer
    ({"key": "main", "plan": "starter", "quantity": 2.5}, 422, "invalid-command"),    # was int(2.5): 2 seats
    ({"key": "main", "plan": "starter", "quantity": "3"}, 422, "invalid-command"),    # a string, not an integer
    ({"key": "main", "plan": "starter", "quantity": True}, 422, "invalid-command"),    # was int(True): 1
    ({"key": "main", "plan": "starter", "quantity": None}, 422, "invalid-command"),
    ({"key": "main", "plan": "starter", "trial": "no"}, 422, "invalid-command"),      # was bool("no"): a trial
    ({"key": "main", "plan": "starter", "trial": 0}, 422, "invalid-command"),
    ({"key": "main", "plan": "starter", "plan_version": "1"}, 422, "invalid-command"),
    ({"key": 5, "plan": "starter"}, 422, "invalid-command"),                          # was stored as "5"
    ({"key": "main", "plan": "starter", "quantity": 0}, 422, "subscription-error"),
    ({"key": "main", "plan": "starter", "collection": "prepaid"}, 422, "invalid-collection"),
    ({"key": "main", "plan": "nope"}, 422, "unknown-plan"),
    (["main", "starter"], 422, "invalid-request"),                                   # not an object
])
def test_a_bad_body_gets_its_problem_and_subscribes_nothing(ledger: LedgerApplication, client: TestClient,
                                                            body: Any, status: int, kind: str) -> None:
    refused = client.post(URL, headers=ADMIN, json=body)
    assert refused.status_code == status, refused.text
    assert refused.headers["content-type"] == PROBLEM_MEDIA_TYPE
    assert refused.json()["type"] == PROBLEM_BASE + kind
    assert live(ledger) == [] and ledger.read(subscription_id("acme", "main"), lambda s: s.key) is None


@pytest.mark.parametrize("at", ["2026-11-22T00:00:00", "yesterday", 12345])
def test_a_malformed_at_gets_a_problem_and_subscribes_nothing(ledger: LedgerApplication, client: TestClient,
                                                               at: Any) -> None:
    """It was a plain-text 500 (the command had made the account's roster before reading ``at``), while the same
    ``at`` on change, cancel, pause or resume was a 422."""
    position = ledger.recorder.max_notification_id() or 0
    refused = client.post(URL, headers=ADMIN, json={"key": "main", "plan": "starter", "at": at})
    assert (refused.status_code, refused.headers["content-type"]) == (422, PROBLEM_MEDIA_TYPE), refused.text
    assert (refused.json()["type"], refused.json()["reason"]) == (PROBLEM_BASE + "invalid-command", "invalid_command")
    assert "at:" in refused.json()["detail"]
    assert ledger.recorder.max_notification_id() == position  # no roster, no subscription, no receipt
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0).isoformat()  # within the backdating window
    assert client.post(URL, headers=ADMIN, json={"key": "main", "plan": "starter", "at": today}).status_code == 201


def test_a_lifecycle_body_is_optional_and_checked_by_its_command(client: TestClient) -> None:
    assert client.post(URL, headers=ADMIN, json={"key": "main", "plan": "starter", "trial": False}).status_code == 201
    wrong = client.post(f"{URL}/main/change", headers=ADMIN, json={"quantity": "many"})
    assert (wrong.status_code, wrong.json()["type"]) == (422, PROBLEM_BASE + "invalid-command")
    not_object = client.post(f"{URL}/main/cancel", headers=ADMIN, json="now")
    assert (not_object.status_code, not_object.json()["type"]) == (422, PROBLEM_BASE + "invalid-request")
    changed = client.post(f"{URL}/main/change", headers=ADMIN, json=example(http_models.SubscriptionChange))
    assert changed.status_code == 200 and changed.json()["quantity"] == 5
    assert client.post(f"{URL}/main/pause", headers=ADMIN).json()["status"] == "paused"


@pytest.mark.parametrize(("action", "body"), [
    ("change", {"quantity": 2.5}), ("change", {"quantity": "3"}), ("change", {"quantity": True}),
    ("change", {"plan": "starter", "plan_version": 1.0}), ("cancel", {"immediately": "no"}),
    ("cancel", {"immediately": 1}), ("cancel", {"immediately": None}),
])
def test_a_bad_lifecycle_value_is_refused_and_changes_nothing(ledger: LedgerApplication, client: TestClient,
                                                              action: str, body: dict[str, Any]) -> None:
    assert client.post(URL, headers=ADMIN, json={"key": "main", "plan": "starter", "quantity": 2,
                                                 "trial": False}).status_code == 201
    sub = subscription_id("acme", "main")
    before = ledger.read(sub, lambda s: (s.quantity, s.status, s.cancel_at_period_end, s.version))
    refused = client.post(f"{URL}/main/{action}", headers=ADMIN, json=body)
    assert (refused.status_code, refused.headers["content-type"]) == (422, PROBLEM_MEDIA_TYPE), refused.text
    assert (refused.json()["type"], refused.json()["reason"]) == (PROBLEM_BASE + "invalid-command", "invalid_command")
    # Still 2 seats billed 98.00, not changed to int(2.5) == 2 / int(True) == 1 or canceled by bool("no").
    assert ledger.read(sub, lambda s: (s.quantity, s.status, s.cancel_at_period_end, s.version)) == before
    assert before[:3] == (2, "active", False)


def test_real_integers_and_booleans_keep_working(ledger: LedgerApplication, client: TestClient) -> None:
    created = client.post(URL, headers=ADMIN, json={"key": "main", "plan": "starter", "quantity": 2, "trial": True,
                                                    "plan_version": 1})
    assert (created.status_code, created.json()["status"], created.json()["quantity"]) == (201, "trialing", 2)
    changed = client.post(f"{URL}/main/change", headers=ADMIN, json={"quantity": 4, "plan_version": None})
    assert (changed.status_code, changed.json()["quantity"]) == (200, 4)
    canceled = client.post(f"{URL}/main/cancel", headers=ADMIN, json={"immediately": False})
    assert (canceled.status_code, canceled.json()["cancel_at_period_end"]) == (200, True)


def test_the_openapi_document_lists_the_fields_of_every_request_body() -> None:
    document = json.loads((DOCS / "openapi.json").read_text())  # current: tests/unit/test_api_documents.py
    schemas = document["components"]["schemas"]

    def body(path: str, method: str = "post") -> dict[str, Any]:
        schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        refs = [s["$ref"] for s in schema.get("anyOf", [schema]) if "$ref" in s]
        assert len(refs) == 1, f"{method.upper()} {path} has an untyped body: {schema}"
        return schemas[refs[0].rsplit("/", 1)[1]]  # type: ignore[no-any-return]

    create = body("/v1/accounts/{tenant}/subscriptions")
    assert set(create["properties"]) == {"key", "plan", "plan_version", "quantity", "trial", "time_zone",
                                         "workspace", "collection", "at"}
    assert create["required"] == ["key", "plan"]
    assert create["properties"]["collection"]["anyOf"][0]["enum"] == ["invoice", "charge_before_access"]
    assert create["properties"]["quantity"]["minimum"] == 1
    catalog = body("/v1/catalog")
    assert {"credit_units", "meters", "plans", "packages", "tax_rules", "promotions", "seller"} <= set(
        catalog["properties"])
    assert catalog["examples"] == [CATALOG]
    plan = schemas["PlanDef"]["properties"]
    assert {"prices", "minimum_spend", "collection", "recurring_credits", "trial_days"} <= set(plan)
    assert {"list_price", "list_prices", "currency"} <= set(schemas["CreditUnitDef"]["properties"])
    for path, operations in document["paths"].items():  # and no route takes an undescribed object
        for method, operation in operations.items():
            if "requestBody" in operation and "application/json" in operation["requestBody"]["content"]:
                assert body(path, method)["properties"], (method, path)


@pytest.mark.parametrize("model", [m for m in vars(http_models).values() if isinstance(m, type)
                                   and issubclass(m, http_models.Described) and m is not http_models.Described])
def test_the_examples_of_a_described_body_are_valid_for_it(model: type[BaseModel]) -> None:
    for value in model.model_json_schema().get("examples", []):
        model.model_validate(value)
