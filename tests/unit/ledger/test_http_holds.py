"""Holds over HTTP: a synchronous yes/no, idempotent by key, captured or released once, tenant-scoped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from billing_events import ids
from billing_events.catalog import EXAMPLE as CATALOG
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication
from billing_ledger.hold_commands import hold_id
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import apply, command, headers, open_account

SERVICE = headers("service")
U = SUBUNITS_PER_UNIT


def available(app: LedgerApplication, tenant: str, unit: str = "USD") -> int:
    return app.read(ids.account_id(tenant), lambda a: a.available(unit))  # type: ignore[return-value]


def place(client: TestClient, tenant: str, key: str, amount: str, **extra: object) -> dict:  # type: ignore[type-arg]
    response = client.post(f"/v1/accounts/{tenant}/holds", json={"idempotency_key": key, "amount": amount, **extra},
                           headers=SERVICE)
    return {**response.json(), "http": response.status_code}


def test_hold_approved_reserves_credit_and_repeat_returns_same_answer(app: LedgerApplication,
                                                                      client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    first = place(client, "acme", "job-1", "30.00")
    assert first["http"] == 201 and first["approved"] is True and first["status"] == "active"
    assert first["hold_id"] == str(hold_id("acme", "job-1")) and first["amount"] == "30.00"
    assert available(app, "acme") == 70 * U
    again = place(client, "acme", "job-1", "30.00")
    assert again["http"] == 200 and again["hold_id"] == first["hold_id"] and again["approved"] is True
    assert available(app, "acme") == 70 * U


def test_hold_beyond_available_is_declined_and_recorded(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "10.00"})
    declined = place(client, "acme", "big", "10.01")
    assert declined["http"] == 201 and declined["approved"] is False
    assert declined["reason"] == "insufficient_credit" and declined["status"] == "rejected"
    got = client.get(f"/v1/accounts/acme/holds/{declined['hold_id']}", headers=headers("viewer", "acme"))
    assert got.status_code == 200 and got.json()["status"] == "rejected"
    assert available(app, "acme") == 10 * U


def test_capture_spends_actual_amount_and_frees_the_rest(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    hold = place(client, "acme", "job", "40.00")["hold_id"]
    captured = client.post(f"/v1/accounts/acme/holds/{hold}/capture", json={"amount": "25.50"}, headers=SERVICE)
    assert captured.status_code == 200, captured.text
    assert captured.json()["status"] == "captured" and captured.json()["captured"] == "25.50"
    assert available(app, "acme") == 100 * U - 2550 * U // 100
    repeat = client.post(f"/v1/accounts/acme/holds/{hold}/capture", json={"amount": "25.50"}, headers=SERVICE)
    assert repeat.status_code == 200 and repeat.json()["captured"] == "25.50"
    assert available(app, "acme") == 100 * U - 2550 * U // 100
    release = client.post(f"/v1/accounts/acme/holds/{hold}/release", headers=SERVICE)
    assert release.status_code == 409 and release.headers["content-type"] == "application/problem+json"
    assert release.json()["reason"] == "hold_already_settled"


def test_a_captured_hold_refuses_another_amount_or_a_release_naming_what_it_captured(
        app: LedgerApplication, client: TestClient) -> None:
    """A second capture of another amount was answered 200 with the first capture (its command id is the hold's, so
    it was a duplicate), as if 30.00 had been spent, while a release of the same hold was a 409."""
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    hold = place(client, "acme", "job", "40.00")["hold_id"]
    capture = f"/v1/accounts/acme/holds/{hold}/capture"
    assert client.post(capture, json={"amount": "25.50"}, headers=SERVICE).status_code == 200
    before = list(app.events.get(ids.account_id("acme")))
    other = client.post(capture, json={"amount": "30.00"}, headers=SERVICE)
    assert (other.status_code, other.headers["content-type"]) == (409, "application/problem+json"), other.text
    assert other.json()["reason"] == "hold_already_settled"
    assert "already captured (25.50 USD)" in other.json()["detail"]
    release = client.post(f"/v1/accounts/acme/holds/{hold}/release", headers=SERVICE)
    assert release.status_code == 409 and "already captured (25.50 USD)" in release.json()["detail"]
    same = client.post(capture, json={"amount": "25.500"}, headers=SERVICE)  # the same amount: the first answer
    assert same.status_code == 200 and same.json()["captured"] == "25.50"
    assert list(app.events.get(ids.account_id("acme"))) == before
    assert available(app, "acme") == 100 * U - 2550 * U // 100


def test_capture_above_hold_is_refused_unless_overage_allowed(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "100.00"})
    hold = place(client, "acme", "job", "10.00")["hold_id"]
    refused = client.post(f"/v1/accounts/acme/holds/{hold}/capture", json={"amount": "12.00"}, headers=SERVICE)
    assert refused.status_code == 422 and refused.json()["reason"] == "capture_exceeds_hold"
    assert refused.json()["detail"] == "capture of 12.00 USD exceeds the hold of 10.00 USD"  # not sub-units
    # Refusals record nothing: the same capture with overage allowed is a fresh decision.
    allowed = client.post(f"/v1/accounts/acme/holds/{hold}/capture", json={"amount": "12.00", "allow_overage": True},
                          headers=SERVICE)
    assert allowed.status_code == 200 and allowed.json()["captured"] == "12.00"
    assert available(app, "acme") == 88 * U


def test_release_returns_credit(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "5.00"})
    hold = place(client, "acme", "job", "5.00")["hold_id"]
    assert available(app, "acme") == 0
    released = client.post(f"/v1/accounts/acme/holds/{hold}/release", headers=SERVICE)
    assert released.status_code == 200 and released.json()["status"] == "released"
    assert available(app, "acme") == 5 * U


def test_expired_hold_cannot_be_captured_and_sweep_releases_it(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "5.00"})
    hold = place(client, "acme", "job", "2.00", ttl_seconds=1)["hold_id"]
    later = datetime.now(UTC) + timedelta(seconds=5)
    [result] = apply(app, command("hold.expire", "acme", {"now": later.isoformat()}))
    assert result.outcome == "applied" and result.value == {"events": 1}
    assert available(app, "acme") == 5 * U
    late = client.post(f"/v1/accounts/acme/holds/{hold}/capture", json={"amount": "1.00"}, headers=SERVICE)
    assert late.status_code == 409 and late.json()["reason"] == "hold_already_settled"


def test_unknown_hold_and_account_are_404(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "5.00"})
    missing = client.get(f"/v1/accounts/acme/holds/{hold_id('acme', 'nope')}", headers=SERVICE)
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert place(client, "nobody", "k", "1.00")["http"] == 404
    capture = client.post(f"/v1/accounts/acme/holds/{hold_id('acme', 'nope')}/capture", json={"amount": "1"},
                          headers=SERVICE)
    assert capture.status_code == 404


def test_auth_roles_and_tenant_scope(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "5.00"})
    body = {"idempotency_key": "k", "amount": "1.00"}
    assert client.post("/v1/accounts/acme/holds", json=body).status_code == 401
    assert client.post("/v1/accounts/acme/holds", json=body, headers=headers("viewer", "acme")).status_code == 403
    other = client.post("/v1/accounts/acme/holds", json=body, headers=headers("service", "someone-else"))
    assert other.status_code == 403
    scoped = client.post("/v1/accounts/acme/holds", json=body, headers=headers("service", "acme"))
    assert scoped.status_code == 201


def test_bad_input_is_a_clear_422_and_changes_nothing(app: LedgerApplication, client: TestClient) -> None:
    open_account(app, "acme", {"key": "g1", "amount": "5.00"})
    for body in ({"idempotency_key": "k", "amount": 1.5},  # a binary float
                 {"idempotency_key": "k", "amount": "-1"},
                 {"idempotency_key": "k", "amount": "0.0000000001"},  # finer than a sub-unit
                 {"idempotency_key": "k", "amount": "1", "ttl_seconds": 0},
                 {"idempotency_key": "", "amount": "1"},
                 {"idempotency_key": "k", "amount": "1", "unit": "EUR"}):
        response = client.post("/v1/accounts/acme/holds", json=body, headers=SERVICE)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    assert available(app, "acme") == 5 * U


def test_malformed_path_parameters_are_422(app: LedgerApplication, client: TestClient) -> None:
    body = {"idempotency_key": "k", "amount": "1"}
    response = client.post("/v1/accounts/bad tenant!/holds", json=body, headers=SERVICE)
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/accounts/acme/holds/not-a-uuid", headers=SERVICE).status_code == 422
    assert client.post("/v1/accounts/acme/allocations/Seats!/x/release", headers=SERVICE).status_code == 422


def test_a_hold_in_a_unit_the_catalogue_does_not_declare_is_refused(app: LedgerApplication,
                                                                    client: TestClient) -> None:
    """docs/money.md: a unit is an ISO 4217 currency or a credit type of the catalogue. A ``ZZZ`` hold was placed
    (and declined for want of credit) in a unit nothing prices."""
    [published] = apply(app, command("catalog.publish", None, {"document": CATALOG, "digest": "c1"}))
    assert published.outcome == "applied"
    open_account(app, "acme", {"key": "g1", "amount": "5.00"}, {"key": "c1", "amount": "100", "unit": "CREDIT"})
    before = list(app.events.get(ids.account_id("acme")))
    refused = client.post("/v1/accounts/acme/holds", json={"idempotency_key": "z", "amount": "1", "unit": "ZZZ"},
                          headers=SERVICE)
    assert (refused.status_code, refused.headers["content-type"]) == (422, "application/problem+json")
    assert refused.json()["reason"] == "unknown_unit"
    [sent] = apply(app, command("hold.place", "acme", {"hold_id": str(hold_id("acme", "k")), "amount": "1",
                                                       "unit": "ZZZ", "expires_at": "2099-01-01T00:00:00+00:00"}))
    assert (sent.outcome, sent.reason) == ("rejected", "unknown_unit")  # over Kafka: its receipt says why
    assert list(app.events.get(ids.account_id("acme"))) == before
    assert app.read(ids.account_id("acme"), lambda a: a.units()) == ["CREDIT", "USD"]
    declared = place(client, "acme", "c", "40", unit="CREDIT")
    assert declared["http"] == 201 and declared["approved"] is True
