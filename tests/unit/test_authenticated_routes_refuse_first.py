"""A request without a valid bearer token gets 401 problem+json, with ``WWW-Authenticate``, on every authenticated
route, before anything of the request is validated: its body (not JSON, or JSON of the wrong shape), its query or
its other path parameters. Before, FastAPI parsed the body before it solved the route's dependencies, so a
request with no token and a body that is not JSON got 422 (``invalid-request``, naming what was wrong with it):
a stranger learnt how the route reads its request before it was asked who it is.

Every route of the four services (as ``billing run`` serves them) is walked, with no token, a token that is not a
JWT, an expired one, one signed with another key and another scheme; only the routes that are not the bearer API's
(the dashboard's pages, signed in with a cookie, and the payment webhooks, signed by their gateway) are left out,
and those are listed: a new route must refuse a stranger first, or be added there on purpose.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from billing_runtime.auth import mint_token
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings

from tests.unit.served_routes import BAD_BODIES, BAD_QUERY, concrete, methods_of, service_routes, serving

# The routes that do not take a bearer token: the dashboard (a cookie; a page without one redirects to sign-in) and
# the payment gateways' webhooks (the gateway's signature over the raw body).
NOT_BEARER = {("GET", "/dashboard"), ("GET", "/dashboard/accounts/{tenant}"),
              ("GET", "/dashboard/accounts/{tenant}/export/{name}.csv"),
              ("GET", "/dashboard/accounts/{tenant}/invoices/{invoice_id:uuid}.pdf"), ("GET", "/dashboard/finance"),
              ("GET", "/dashboard/login"), ("POST", "/dashboard/login"), ("POST", "/dashboard/logout"),
              ("POST", "/v1/webhooks/{gateway}")}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runner, Settings]]:
    async with serving(tmp_path) as found:
        yield found


def _credentials(settings: Settings) -> dict[str, str | None]:
    """Authorization headers that authenticate no one."""
    other_key = replace(settings, jwt_secret="another-key-" + "x" * 32)
    return {"none": None, "not a JWT": "Bearer not-a-jwt",
            "expired": f"Bearer {mint_token(settings, role='admin', ttl_seconds=-60)}",
            "another key": f"Bearer {mint_token(other_key, role='admin')}", "another scheme": "Basic YWRtaW46YWRtaW4="}


async def test_authenticated_routes_answer_401_to_a_stranger_whatever_the_request(
        served: tuple[Runner, Settings]) -> None:
    runner, settings = served
    routes = sorted({(method, getattr(route, "path", "")) for route in service_routes(runner)
                     for method in methods_of(route)})
    assert NOT_BEARER <= set(routes)
    walked = [route for route in routes if route not in NOT_BEARER]
    assert len(walked) > 60, walked  # the walk found the services' routes (ingest, rating, ledger, projections)
    wrong: list[tuple[str, str, str, int, str]] = []
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=runner.app), base_url="http://test") as client:
        for method, template in walked:
            path = concrete(template, "acme")
            for name, authorization in _credentials(settings).items():
                head = {"Content-Type": "application/json", "Idempotency-Key": "k-1"}
                if authorization is not None:
                    head["Authorization"] = authorization
                for body in BAD_BODIES if method in ("POST", "PUT", "PATCH") else [b""]:
                    response = await client.request(method, path, params=BAD_QUERY, content=body, headers=head)
                    if (response.status_code != 401
                            or response.headers.get("content-type") != "application/problem+json"
                            or not response.headers.get("www-authenticate", "").startswith('Bearer realm="billing"')
                            or response.json().get("type") != "https://billing.dev/problems/unauthorized"):
                        wrong.append((method, template, name, response.status_code, body.decode()))
    assert wrong == [], "\n".join(map(str, wrong))
