"""A token of one tenant gets 403 on every route addressed to another tenant, before anything of the request is
validated: its body (not JSON, or JSON of the wrong shape), its query or its other path parameters. Before, FastAPI
answered 422 for a bad body or query before the route compared the tenant, so another tenant's routes answered a
stranger differently depending on what it sent.

Every route of the four services (as ``billing run`` serves them) whose path names a ``{tenant}``, or that takes a
``tenant`` query filter, is walked; a new route is covered without being listed here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_cli.main import SERVICES, _builders, _bus
from billing_runtime.auth import mint_token
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings
from fastapi.routing import APIRoute
from starlette.routing import Route

OWN, OTHER = "acme", "globex"
UUID_TEXT = "6f1c2a9e-0b7d-4d3e-9a51-2c8f0e7b4a10"
# Every query parameter a route might validate, each with a value no route accepts (a number out of range, a
# malformed moment): sent to every route, so a route that validates its query before the tenant answers 422.
BAD_QUERY = {"limit": "-5", "year": "abc", "month": "99", "at": "not-a-time", "quantity": "many",
             "plan_version": "x", "granularity": "century", "cursor": "%%%", "from": "x", "to": "y", "unit": "?",
             "amount": "lots", "format": "pdf"}
BAD_BODIES = [b"{not json", b'{"amount": "NaN", "idempotency_key": 5}', b"[]"]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runner, Settings]]:
    settings = Settings(data_dir=tmp_path)
    runner = Runner(settings, _bus(settings), _builders(SERVICES), "billing", None)
    await runner.start()
    try:
        yield runner, settings
    finally:
        await runner.stop()


def _routes(runner: Runner) -> list[tuple[str, str, bool]]:
    """(method, path, tenant in the query) of every route addressed to a tenant."""
    found: set[tuple[str, str, bool]] = set()
    for part in runner.parts:
        for router in part.routers:
            for route in router.routes:
                if not isinstance(route, Route) or route.methods is None:
                    continue  # the lean hold and balance handlers: their FastAPI routes are walked (same path)
                methods = sorted(route.methods - {"HEAD"})
                in_path = "{tenant}" in route.path
                in_query = isinstance(route, APIRoute) and any(
                    p.alias == "tenant" for p in route.dependant.query_params)
                if in_path or in_query:
                    found.update((method, route.path, not in_path) for method in methods)
    return sorted(found)


def _concrete(template: str) -> str:
    """The path with ``OTHER`` as its tenant and values that pass no parameter's validation where a converter
    allows it (a uuid where the route's converter only matches one)."""
    def value(match: re.Match[str]) -> str:
        name, _, convertor = match.group(1).partition(":")
        if name == "tenant":
            return OTHER
        return UUID_TEXT if convertor == "uuid" else "bad value"

    return re.sub(r"\{([^}]+)\}", value, template).replace(" ", "%20")


async def test_another_tenants_routes_answer_403_whatever_the_request(served: tuple[Runner, Settings]) -> None:
    runner, settings = served
    routes = _routes(runner)
    assert len(routes) > 60, routes  # the walk found the services' routes (ledger, projections, rating, dashboard)
    assert any(path.startswith("/dashboard/") for _, path, _ in routes)
    assert any(query for _, _, query in routes)
    # An admin of its own tenant: every role check of these routes passes, only the tenant differs.
    token = mint_token(settings, role="admin", tenant=OWN)
    wrong: list[tuple[str, str, int, str]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runner.app), base_url="http://test") as client:
        for method, template, tenant_in_query in routes:
            path = _concrete(template)
            query: dict[str, Any] = {**BAD_QUERY, **({"tenant": OTHER} if tenant_in_query else {})}
            for body in BAD_BODIES if method in ("POST", "PUT", "PATCH") else [b""]:
                response = await client.request(method, path, params=query, content=body, headers={
                    "Authorization": f"Bearer {token}", "Content-Type": "application/json",
                    "Idempotency-Key": "k-1"})
                expected_type = "text/html" if path.startswith("/dashboard/") else "application/problem+json"
                if response.status_code != 403 or not response.headers.get("content-type", "").startswith(
                        expected_type):
                    wrong.append((method, template, response.status_code, body.decode()))
    assert wrong == [], "\n".join(map(str, wrong))
