"""A subscription's key names it in URL paths (``.../subscriptions/{key}``): a key no path can address is refused.

Review (session 13): ``{"key": "a/b"}`` was subscribed (201) but every route answered 404 (``a%2Fb`` is routed as
two path segments), while it counted towards the account's limit of 3 and billed each month; a 5,000-character key
was stored as given. The same holds for the other keys a path reads back (payment methods here; allocations,
orders and refund requests in their own tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.roster import roster_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.subscriptions.test_subscriptions import run

URL = "/v1/accounts/acme/subscriptions"
ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}
UNREACHABLE = ["a/b", "x" * 5000, "x" * 129, "-lead", "tab\tkey", "line\n", "ключ"]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="keys-1").outcome == "applied"
    assert run(app, "account.open", "acme", currency="USD").outcome == "applied"
    yield app
    app.close()


@pytest.fixture
def client(ledger: LedgerApplication, tmp_path: Path) -> TestClient:
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    return TestClient(api)


@pytest.mark.parametrize("key", UNREACHABLE)
def test_a_key_no_path_can_address_is_refused_and_takes_no_place_in_the_limit(
        ledger: LedgerApplication, client: TestClient, key: str) -> None:
    position = ledger.recorder.max_notification_id() or 0
    refused = client.post(URL, headers=ADMIN, json={"key": key, "plan": "starter", "trial": False})
    assert (refused.status_code, refused.headers["content-type"]) == (422, PROBLEM_MEDIA_TYPE), refused.text
    assert (refused.json()["type"], refused.json()["reason"]) == (PROBLEM_BASE + "invalid-command", "invalid_command")
    assert "key must be 1 to 128" in refused.json()["detail"]
    assert ledger.recorder.max_notification_id() == position  # no roster, no subscription, no invoice
    # The account's three subscriptions are all its own to take, and each is reachable by its key.
    for good in ("main", "team.eu-2", "x" * 128):
        assert client.post(URL, headers=ADMIN, json={"key": good, "plan": "starter", "trial": False}
                           ).status_code == 201
        assert client.get(f"{URL}/{good}", headers=ADMIN).json()["status"] == "active"
    assert len(ledger.read(roster_id("acme"), lambda r: list(r.live)) or []) == 3


def test_a_key_with_a_slash_sent_through_kafka_is_rejected_with_its_reason(ledger: LedgerApplication) -> None:
    command = LedgerCommand(command_id=uuid4(), kind="subscription.create", tenant="acme", issued_at=utcnow(),
                            issued_by="cli:billing-subscription", payload={"key": "a/b", "plan": "starter"})
    [result] = ledger.apply_commands([command])  # as the consumer applies it: the rejection is recorded
    assert (result.outcome, result.reason) == ("rejected", "invalid_command")
    assert ledger.read(roster_id("acme"), lambda r: list(r.live)) is None


def test_a_payment_method_id_no_path_can_delete_is_refused(ledger: LedgerApplication, client: TestClient) -> None:
    methods = "/v1/accounts/acme/payment-methods"
    refused = client.post(methods, headers=ADMIN, json={"method_id": "pm/1", "default": True})
    assert (refused.status_code, refused.json()["type"]) == (422, PROBLEM_BASE + "invalid-command"), refused.text
    assert ledger.read(roster_id("acme"), lambda r: list(r.payment_methods)) is None
    assert client.post(methods, headers=ADMIN, json={"method_id": "pm_1", "default": True}).status_code == 201
    assert client.delete(f"{methods}/pm_1", headers=ADMIN).status_code == 204
