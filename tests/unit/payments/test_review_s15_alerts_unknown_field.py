"""Session 15 review: ``PUT /v1/accounts/{t}/alerts`` drops a field it does not know and replaces the settings with
what is left. On the real stack (namespace review15c) ``{"emial": "x@y.z"}`` answered 200 with ``email: null``: a typo
in an update silently removes the address low-balance and card-expiry alerts went to, and the customer learns it when
its balance runs out. Fixed in session 15 (``AlertSettings`` forbids extra fields)."""

from __future__ import annotations

from billing_ledger.application import LedgerApplication
from billing_ledger.domain.payment_profile import payment_profile_id

from tests.unit.payments.support import TENANT, client, headers, ledger

__all__ = ["ledger"]


def test_an_alerts_update_with_a_misspelt_field_is_refused_and_keeps_the_address(ledger: LedgerApplication) -> None:
    http = client(ledger, {})
    url = f"/v1/accounts/{TENANT}/alerts"
    assert http.put(url, headers=headers("admin"), json={"email": "ops@acme.example"}).status_code == 200
    response = http.put(url, headers=headers("admin"), json={"emial": "finance@acme.example"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "emial" in response.text
    assert ledger.read(payment_profile_id(TENANT), lambda p: dict(p.alerts))["email"] == "ops@acme.example"
