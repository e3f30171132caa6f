"""Pooled allocations over HTTP: atomic, idempotent by request id, never beyond capacity."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from billing_ledger.application import LedgerApplication
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import headers

SERVICE = headers("service")
ADMIN = headers("admin")


def set_capacity(client: TestClient, tenant: str, resource: str, capacity: int) -> dict:  # type: ignore[type-arg]
    response = client.put(f"/v1/accounts/{tenant}/pools/{resource}", json={"capacity": capacity}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def allocate(client: TestClient, request_id: str, quantity: int = 1, tenant: str = "acme"):  # type: ignore[no-untyped-def]
    return client.post(f"/v1/accounts/{tenant}/allocations",
                       json={"request_id": request_id, "resource": "seats", "quantity": quantity}, headers=SERVICE)


def test_allocations_up_to_capacity_then_refused(app: LedgerApplication, client: TestClient) -> None:
    assert set_capacity(client, "acme", "seats", 3)["capacity"] == 3
    first = allocate(client, "alice", 2)
    assert first.status_code == 201 and first.json()["allocated"] is True and first.json()["free"] == 1
    refused = allocate(client, "bob", 2)
    assert refused.status_code == 200 and refused.json()["allocated"] is False
    assert refused.json()["status"] == "refused" and refused.json()["in_use"] == 2
    assert allocate(client, "carol", 1).json()["allocated"] is True


def test_repeated_request_gets_first_answer(app: LedgerApplication, client: TestClient) -> None:
    set_capacity(client, "acme", "seats", 1)
    assert allocate(client, "alice").status_code == 201
    again = allocate(client, "alice")
    assert again.status_code == 200 and again.json()["allocated"] is True and again.json()["in_use"] == 1
    refused = allocate(client, "bob")
    assert refused.json()["allocated"] is False
    # bob's refusal is remembered even after capacity frees up: a retry must not change the answer.
    assert client.post("/v1/accounts/acme/allocations/seats/alice/release", headers=SERVICE).status_code == 200
    assert allocate(client, "bob").json()["allocated"] is False
    assert allocate(client, "bob-2").json()["allocated"] is True


def test_release_frees_capacity_once(app: LedgerApplication, client: TestClient) -> None:
    set_capacity(client, "acme", "seats", 1)
    allocate(client, "alice")
    released = client.post("/v1/accounts/acme/allocations/seats/alice/release", headers=SERVICE)
    assert released.status_code == 200 and released.json()["status"] == "released"
    assert released.json()["in_use"] == 0
    again = client.post("/v1/accounts/acme/allocations/seats/alice/release", headers=SERVICE)
    assert again.status_code == 200 and again.json()["in_use"] == 0
    got = client.get("/v1/accounts/acme/allocations/seats/alice", headers=headers("viewer", "acme"))
    assert got.status_code == 200 and got.json()["status"] == "released"


def test_capacity_cannot_drop_below_usage(app: LedgerApplication, client: TestClient) -> None:
    set_capacity(client, "acme", "seats", 2)
    allocate(client, "alice", 2)
    refused = client.put("/v1/accounts/acme/pools/seats", json={"capacity": 1}, headers=ADMIN)
    assert refused.status_code == 409 and refused.json()["reason"] == "capacity_below_usage"


def test_unknown_pool_and_roles(app: LedgerApplication, client: TestClient) -> None:
    assert allocate(client, "alice").status_code == 404
    body = {"capacity": 3}
    assert client.put("/v1/accounts/acme/pools/seats", json=body, headers=SERVICE).status_code == 403
    assert client.get("/v1/accounts/acme/allocations/seats/x", headers=SERVICE).status_code == 404


def test_parallel_requests_never_exceed_capacity(app: LedgerApplication, client: TestClient) -> None:
    set_capacity(client, "acme", "seats", 7)
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda i: allocate(client, f"user-{i}"), range(40)))
    assert all(r.status_code in (200, 201) for r in responses), [r.text for r in responses if r.status_code >= 300]
    granted = [r for r in responses if r.json()["allocated"]]
    assert len(granted) == 7
    final = client.get("/v1/accounts/acme/allocations/seats/user-0", headers=SERVICE).json()
    assert final["in_use"] == 7 and final["capacity"] == 7


def test_a_request_id_no_path_can_address_is_refused(app: LedgerApplication, client: TestClient) -> None:
    """``a/b`` was allocated (201) but ``.../allocations/seats/a%2Fb`` is routed as two path segments: it could never
    be read nor released, its seat held for good."""
    set_capacity(client, "acme", "seats", 1)
    for request_id in ("a/b", "x" * 129):
        refused = allocate(client, request_id)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
    taken = allocate(client, "a-b")  # the one seat is still free
    assert (taken.status_code, taken.json()["allocated"], taken.json()["in_use"]) == (201, True, 1)
    assert client.post("/v1/accounts/acme/allocations/seats/a-b/release", headers=SERVICE).status_code == 200
