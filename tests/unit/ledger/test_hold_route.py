"""POST /v1/accounts/{tenant}/holds: the lean ASGI handler (holds_http.py) answers exactly as the FastAPI route it
stands in front of: status, headers and body bytes, for placed holds, retries, refusals and every problem+json
answer (which it leaves to that route); the path stays in the OpenAPI document. Two ledgers, each with the same
accounts, one served with the handler and one without, get the same requests in the same order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from billing_ledger import holds_http
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.http import build_router
from billing_runtime.http import create_app
from fastapi.testclient import TestClient

from tests.unit.ledger.ledger_support import SETTINGS, headers, open_account

SERVICE = headers("service")
FROZEN = "2026-11-21T10:00:00+00:00"


@pytest.fixture
def clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, TestClient]]:
    """(lean, reference), each on a ledger of its own with the same accounts; the clock is frozen, so the
    holds' times (and so the bytes) are the same on both."""
    from datetime import datetime

    from billing_ledger import http

    monkeypatch.setattr(http, "_now", lambda: datetime.fromisoformat(FROZEN))
    made: list[LedgerApplication] = []
    pair: list[TestClient] = []
    for lean in (True, False):
        app = LedgerApplication(persistence_env(None, str(tmp_path / f"lean-{lean}")))
        made.append(app)
        open_account(app, "acme", {"key": "g1", "amount": "100.00"})
        open_account(app, "scoped", {"key": "g1", "amount": "0.50"}, {"key": "tokens", "amount": "10",
                                                                       "unit": "USD", "scope": ["ai_tokens"]})
        api = create_app("ledger-test", SETTINGS)
        api.include_router(build_router(app, lean_hold=lean))
        pair.append(TestClient(api, raise_server_exceptions=False))
    yield pair[0], pair[1]
    for app in made:
        app.close()


def both(clients: tuple[TestClient, TestClient], method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    lean, reference = (client.request(method, path, **kwargs) for client in clients)
    assert lean.status_code == reference.status_code, (path, kwargs, lean.text, reference.text)
    assert lean.content == reference.content, (path, kwargs)
    assert dict(lean.headers) == dict(reference.headers), (path, kwargs)
    return lean.status_code, lean.content


def test_the_lean_handler_serves_the_path_and_the_fastapi_route_documents_it(tmp_path: Path) -> None:
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        router = build_router(app)
        lean = [r for r in router.routes if getattr(r, "name", "") == "place_hold_lean"]
        assert len(lean) == 1 and router.routes.index(lean[0]) < router.routes.index(
            next(r for r in router.routes if getattr(r, "name", "") == "place_hold"))
        assert isinstance(lean[0].app, holds_http.HoldEndpoint)  # type: ignore[attr-defined]
        api = create_app("ledger-test", SETTINGS)
        api.include_router(router)
        assert "post" in TestClient(api).get("/openapi.json").json()["paths"][holds_http.PATH]
    finally:
        app.close()


def test_placed_retried_and_refused_holds_are_answered_alike(clients: tuple[TestClient, TestClient]) -> None:
    hold = "/v1/accounts/acme/holds"
    assert both(clients, "POST", hold, json={"idempotency_key": "job-1", "amount": "30.00"}, headers=SERVICE)[0] == 201
    assert both(clients, "POST", hold, json={"idempotency_key": "job-1", "amount": "30.00"}, headers=SERVICE)[0] == 200
    declined = both(clients, "POST", hold, json={"idempotency_key": "big", "amount": "1000", "ttl_seconds": 60},
                    headers=SERVICE)
    assert declined[0] == 201 and b'"insufficient_credit"' in declined[1]
    meter = both(clients, "POST", "/v1/accounts/scoped/holds", headers=headers("admin"),
                 json={"idempotency_key": "ai", "amount": "10.25", "meter": "ai_tokens", "unit": "USD"})
    assert meter[0] == 201 and b'"approved":true' in meter[1]
    scoped_token = headers("service", "acme")
    assert both(clients, "POST", hold, json={"idempotency_key": "mine", "amount": "1"}, headers=scoped_token)[0] == 201
    assert both(clients, "POST", "/v1/accounts/nobody/holds", json={"idempotency_key": "k", "amount": "1"},
                headers=SERVICE)[0] == 404
    # A charset parameter, or another case, is still JSON.
    for n, kind in enumerate(("application/json; charset=utf-8", "Application/JSON")):
        assert both(clients, "POST", hold, content=b'{"idempotency_key":"cs%d","amount":"2"}' % n,
                    headers={**SERVICE, "content-type": kind})[0] == 201


def test_every_request_it_does_not_take_on_gets_the_routes_own_answer(clients: tuple[TestClient, TestClient]) -> None:
    hold = "/v1/accounts/acme/holds"
    body = {"idempotency_key": "k", "amount": "1.00"}
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", hold, {"json": body}, 401),  # no token
        ("POST", hold, {"json": body, "headers": {"Authorization": "Basic abc"}}, 401),
        ("POST", hold, {"json": body, "headers": {"Authorization": "Bearer not-a-token"}}, 401),
        ("POST", hold, {"json": body, "headers": headers("viewer", "acme")}, 403),
        ("POST", hold, {"json": body, "headers": headers("finance")}, 403),
        ("POST", hold, {"json": body, "headers": headers("service", "someone-else")}, 403),
        ("POST", "/v1/accounts/bad tenant!/holds", {"json": body, "headers": SERVICE}, 422),
        ("POST", hold, {"content": b"{not json", "headers": {**SERVICE, "content-type": "application/json"}}, 422),
        ("POST", hold, {"content": b"", "headers": SERVICE}, 422),
        ("POST", hold, {"content": b'{"idempotency_key":"t","amount":"1"}',
                        "headers": {**SERVICE, "content-type": "text/plain"}}, 422),
        ("POST", hold, {"content": b'{"idempotency_key":"x","amount":"1"}', "headers": SERVICE}, 422),  # no type: not JSON
        ("POST", hold, {"json": {**body, "amount": 1.5}, "headers": SERVICE}, 422),  # a binary float
        ("POST", hold, {"json": {**body, "amount": "-1"}, "headers": SERVICE}, 422),
        ("POST", hold, {"json": {**body, "ttl_seconds": 0}, "headers": SERVICE}, 422),
        ("POST", hold, {"json": {**body, "extra": True}, "headers": SERVICE}, 422),
        ("POST", hold, {"json": {**body, "unit": "EUR"}, "headers": SERVICE}, 422),  # decided: no EUR wallet
        ("POST", hold, {"json": [body], "headers": SERVICE}, 422),
        ("GET", hold, {"headers": SERVICE}, 405),
        ("PUT", hold, {"json": body, "headers": SERVICE}, 405),
    ]
    for method, path, kwargs, status in cases:
        assert both(clients, method, path, **kwargs)[0] == status, (method, path, kwargs)
