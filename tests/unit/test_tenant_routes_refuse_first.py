"""A token of one tenant gets 403 on every route addressed to another tenant, before anything of the request is
validated: its body (not JSON, or JSON of the wrong shape), its query or its other path parameters. Before, FastAPI
answered 422 for a bad body or query before the route compared the tenant, so another tenant's routes answered a
stranger differently depending on what it sent.

Every route of the four services (as ``billing run`` serves them) whose path names a ``{tenant}``, or that takes a
``tenant`` query filter, is walked; a new route is covered without being listed here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from billing_runtime.auth import mint_token
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings
from fastapi.routing import APIRoute

from tests.unit.served_routes import BAD_BODIES, BAD_QUERY, concrete, methods_of, service_routes, serving

OWN, OTHER = "acme", "globex"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runner, Settings]]:
    async with serving(tmp_path) as found:
        yield found


def _routes(runner: Runner) -> list[tuple[str, str, bool]]:
    """(method, path, tenant in the query) of every route addressed to a tenant."""
    found: set[tuple[str, str, bool]] = set()
    for route in service_routes(runner):
        path = getattr(route, "path", "")
        in_path = "{tenant}" in path
        in_query = isinstance(route, APIRoute) and any(p.alias == "tenant" for p in route.dependant.query_params)
        if in_path or in_query:
            found.update((method, path, not in_path) for method in methods_of(route))
    return sorted(found)


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
            path = concrete(template, OTHER)
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
