"""GET /v1/accounts/{tenant}/balance: the lean ASGI handler (api_balance.py) answers exactly as the FastAPI route
it replaces (validated and serialized by ``api_models.Balance``): status, headers and body bytes, for balances
and for every problem+json answer, and the path stays in the OpenAPI document. On SQLite, and on PostgreSQL
(the API's production reads: other column types) when ``DATABASE_URL`` is set, there also with the API's copy of
balance states (balance_cache.py: kept by the consumer's notifications) serving the lean handler."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_events.timeutil import utcnow
from billing_projections import api_balance, api_models
from billing_projections.balance_cache import BalanceCache
from billing_projections.http import build_routers
from billing_projections.service import ProjectionService
from billing_runtime.auth import mint_token
from billing_runtime.db import Database, PostgresDatabase, SqliteDatabase
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi import FastAPI

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, U, full_scenario, simple_account, uid, usage_cause

SETTINGS = Settings()
TENANTS = ("acme", "globex", "initech", "empty")


def token(role: str, tenant: str | None = None) -> str:
    return mint_token(SETTINGS, role=role, tenant=tenant)


def bearer(role: str, tenant: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(role, tenant)}"}


CACHES: dict[int, BalanceCache] = {}  # id(service) -> its API's copy of balance states ("postgres-cached")


def app_of(service: ProjectionService, *, lean_balance: bool) -> FastAPI:
    app = create_app("projections", SETTINGS)
    for router in build_routers(service.db, lean_balance=lean_balance, balance_cache=CACHES.get(id(service))):
        app.include_router(router)
    return app


@pytest.fixture(params=["sqlite", "postgres", "postgres-cached"])
async def any_service(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ProjectionService]:
    db: Database
    stopping = asyncio.Event()
    listener: asyncio.Task[None] | None = None
    if request.param == "sqlite":
        db = await SqliteDatabase(tmp_path / "projections.sqlite").connect()
    else:
        url = os.environ.get("DATABASE_URL")
        if not url:
            pytest.skip("DATABASE_URL is not set")
        schema = f"balance_route_{uuid.uuid4().hex[:10]}"
        db = await PostgresDatabase(url, schema, reset_sessions=False).connect()
    try:
        service = ProjectionService(db, notify_balances=request.param == "postgres-cached")
        await service.setup()
        if request.param == "postgres-cached":
            cache = CACHES[id(service)] = BalanceCache(db, url, schema)
            listener = asyncio.create_task(cache.listen(stopping))
            while not cache.listening:
                await asyncio.sleep(0.01)
        yield service
    finally:
        stopping.set()
        if listener is not None:
            await listener
        CACHES.clear()
        if isinstance(db, PostgresDatabase):
            await db.execute("DO $$ BEGIN EXECUTE format('DROP SCHEMA %I CASCADE', current_schema()); END $$")
        await db.close()


@pytest.fixture
async def clients(any_service: ProjectionService) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(lean, reference): the same read models behind the app as served and the FastAPI route alone."""
    service = any_service
    ledger = Ledger()
    full_scenario(ledger, "acme")  # USD and CREDIT wallets, holds, overage, low balance reached
    simple_account(ledger, "globex", debits=7)
    # A grant expiring within the week (expiring_soon is relative to now), amounts below the cent, a threshold.
    initech = ledger.open("initech", currency="EUR", threshold=20 * U)
    now = utcnow()
    initech.grant_credit(grant_id=uid("initech", "soon"), unit="EUR", amount=30 * U, effective_at=now,
                         expires_at=now + timedelta(days=2), scope=None, source="manual", cause={},
                         granted_by="finance@test")
    initech.debit_usage(command_id=uid("initech", "d"), unit="EUR", amount=U // 3, meter="api_calls", at=now,
                        overage_policy="overage", cause=usage_cause("e-1", "1"))
    ledger.save(initech)
    ledger.save(ledger.open("empty"))  # opened, nothing else
    await apply(service, ledger.records())
    cache = CACHES.get(id(service))
    if cache is not None:  # every tenant's state notified: the lean handler answers from the copy
        for _ in range(500):
            if len(cache) == len(TENANTS):
                break
            await asyncio.sleep(0.01)
        assert len(cache) == len(TENANTS)
    transports = [httpx.ASGITransport(app=app_of(service, lean_balance=lean)) for lean in (True, False)]
    async with httpx.AsyncClient(transport=transports[0], base_url="http://test") as lean, \
            httpx.AsyncClient(transport=transports[1], base_url="http://test") as reference:
        yield lean, reference


def answer(response: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
    return response.status_code, response.headers.multi_items(), response.content


async def both(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], method: str, path: str,
               headers: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
    lean, reference = clients
    return (await lean.request(method, path, headers=headers), await reference.request(method, path, headers=headers))


async def test_balances_are_byte_identical_to_the_model_built_response(
        clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    for tenant in TENANTS:
        for headers in (bearer("viewer", tenant), bearer("admin"), bearer("finance", tenant)):
            served, model_built = await both(clients, "GET", f"/v1/accounts/{tenant}/balance", headers)
            assert served.status_code == 200, served.text
            assert answer(served) == answer(model_built), tenant
            body: dict[str, Any] = served.json()
            assert api_models.Balance.model_validate_json(served.content).model_dump(mode="json") == body
    initech = (await clients[0].get("/v1/accounts/initech/balance", headers=bearer("viewer", "initech"))).json()
    [eur] = initech["wallets"]
    assert (eur["balance"], eur["expiring_soon"], eur["low_balance_threshold"]) == ("29.666666667", "29.666666667", "20.00")
    empty = (await clients[0].get("/v1/accounts/empty/balance", headers=bearer("viewer", "empty"))).json()
    assert [w["balance"] for w in empty["wallets"]] == ["0.00"]


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/v1/accounts/nobody/balance", {"Authorization": f"Bearer {token('admin')}"}, 404),
    ("/v1/accounts/nobody/balance", {"Authorization": f"Bearer {token('viewer', 'nobody')}"}, 404),
    ("/v1/accounts/acme/balance", {"Authorization": f"Bearer {token('viewer', 'globex')}"}, 403),
    ("/v1/accounts/acme/balance", {}, 401),
    ("/v1/accounts/acme/balance", {"Authorization": f"Basic {token('viewer', 'acme')}"}, 401),
    ("/v1/accounts/acme/balance", {"Authorization": "Bearer "}, 401),
    ("/v1/accounts/acme/balance", {"Authorization": "Bearer not-a-jwt"}, 401),
    ("/v1/accounts/acme/balance", {"Authorization": f"Bearer {token('viewer', 'acme')}x"}, 401),
])
async def test_problems_are_the_same(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], path: str,
                                     headers: dict[str, str], status: int) -> None:
    served, model_built = await both(clients, "GET", path, headers)
    assert served.status_code == status
    assert served.headers["content-type"] == "application/problem+json"
    assert served.json()["instance"] == path
    assert answer(served) == answer(model_built)


@pytest.mark.parametrize("method", ["HEAD", "POST", "PUT", "DELETE", "OPTIONS"])
async def test_other_methods_are_refused_the_same_way(clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                                      method: str) -> None:
    served, model_built = await both(clients, method, "/v1/accounts/acme/balance", bearer("viewer", "acme"))
    assert served.status_code == 405 and served.headers["allow"] == "GET"
    assert answer(served) == answer(model_built)


async def test_the_lean_handler_serves_the_path(clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    serve = api_balance.BalanceEndpoint.__call__

    async def counted(self: api_balance.BalanceEndpoint, scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope["path"])
        await serve(self, scope, receive, send)

    monkeypatch.setattr(api_balance.BalanceEndpoint, "__call__", counted)
    served, _ = await both(clients, "GET", "/v1/accounts/acme/balance", bearer("viewer", "acme"))
    assert served.status_code == 200 and calls == ["/v1/accounts/acme/balance"]
    # Neighbouring paths are not its own.
    assert (await clients[0].get("/v1/accounts/acme/grants", headers=bearer("viewer", "acme"))).status_code == 200
    assert calls == ["/v1/accounts/acme/balance"]


async def test_the_openapi_document_still_describes_the_balance(
        clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> None:
    served, model_built = await both(clients, "GET", "/openapi.json", {})
    assert served.json() == model_built.json()
    operations = served.json()["paths"]["/v1/accounts/{tenant}/balance"]
    assert set(operations) == {"get"}
    schema = operations["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/Balance"}
