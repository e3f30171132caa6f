"""The optional VIES registration lookup in front of `tax_profile.set` (an offline stand-in for the EU API)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.subscriptions_http import build_router
from billing_ledger.vies import ViesRegistry
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient


def vies(answer: dict[str, object] | None) -> ViesRegistry:
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["countryCode"] == "DE" and body["vatNumber"] == "136695976"
        if answer is None:
            raise httpx.ConnectError("down", request=request)
        return httpx.Response(200, json=answer)

    return ViesRegistry("http://vies.test/check", transport=httpx.MockTransport(handle))


def client(tmp_path: Path, registry: ViesRegistry) -> TestClient:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    import uuid
    from datetime import UTC, datetime

    ledger.apply_commands([LedgerCommand(command_id=uuid.uuid4(), kind="account.open", tenant="acme",
                                         issued_at=datetime.now(UTC), issued_by="t", payload={"currency": "EUR"})])
    settings = Settings(data_dir=tmp_path)
    app = create_app("t", settings)
    app.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing", registry))
    return TestClient(app)


def put(c: TestClient) -> httpx.Response:
    token = mint_token(Settings(), role="finance")
    return c.put("/v1/accounts/acme/tax-profile", headers={"Authorization": f"Bearer {token}"},
                 json={"country": "DE", "business_name": "Acme GmbH", "tax_id": "DE136695976"})


def test_a_registered_number_is_recorded_as_checked(tmp_path: Path) -> None:
    response = put(client(tmp_path, vies({"valid": True})))
    assert response.status_code == 200, response.text
    assert response.json()["tax_profile"]["vies"] == "registered"


def test_an_unregistered_number_is_refused(tmp_path: Path) -> None:
    response = put(client(tmp_path, vies({"valid": False})))
    assert response.status_code == 422 and response.json()["reason"] == "vat_id_not_registered"


def test_an_unreachable_registry_does_not_block_a_valid_number(tmp_path: Path) -> None:
    response = put(client(tmp_path, vies(None)))
    assert response.status_code == 200 and response.json()["tax_profile"]["vies"] == "not_checked"


def test_a_vat_id_of_another_member_state_is_refused_without_asking_vies(tmp_path: Path) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("VIES asked about an id the profile's country cannot have")

    c = client(tmp_path, ViesRegistry("http://vies.test/check", transport=httpx.MockTransport(handle)))
    token = mint_token(Settings(), role="finance")
    response = c.put("/v1/accounts/acme/tax-profile", headers={"Authorization": f"Bearer {token}"},
                     json={"country": "AT", "business_name": "Deutsche GmbH", "tax_id": "DE136695976"})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["reason"] == "vat_id_country_mismatch" and "from DE, not AT" in response.json()["detail"]
    profile = c.get("/v1/accounts/acme/tax-profile", headers={"Authorization": f"Bearer {token}"}).json()
    assert profile["tax_profile"] is None
