"""``GET /v1/accounts/{tenant}/balance``, the query API's hottest route, as a small ASGI handler.

The route is declared twice in ``api_accounts.build_router``: this handler first, which serves every request
to the path, then the FastAPI route (``response_model=Balance``), which describes it in the OpenAPI document
and is the reference it is tested against (tests/unit/projections/test_balance_route.py, SQLite and
PostgreSQL: the same status, headers and bytes for balances, an unknown tenant, another tenant's token, no
or a bad token, and every other method).

Why: through FastAPI's request handling (the request object, dependency solving, the endpoint's wrappers) a
balance read cost the API process 264-275 us of CPU in process (PostgreSQL, no HTTP) around 120-140 us of
query and view; served here, 187-199 us. End to end (``serve projections --role api``, a keep-alive client,
one read at a time) 373-382 -> 292-294 us per read, and under the benchmark's 5,000 usage events/s the
median read 0.74-0.78 -> 0.64-0.71 ms. The p99 (4.2-5.3 ms either way on 2 shared cores) is mostly waiting
for a core: each read wakes the client, the API twice and a PostgreSQL backend (bench_projections.py). Served
from the API's copy of balance states (session 12, ``balance_cache.py``), 171-197 -> 27-29 us of CPU in process,
and a read wakes the client and the API once each.

What stays the same: the app's middleware (problem+json for every exception raised here, as for any route),
the authentication (``billing_runtime.auth``: the verifier's token memory, the same 401 and 403 problems),
the view (``views.balance_view``: one indexed query; on PostgreSQL from the API's copy of balance states kept by
the consumer's notifications, ``balance_cache.py``, the same answer for the same committed state) serialized as before (orjson: the view already has the
model's exact shape), and 405 for any other method with ``Allow: GET`` (FastAPI's GET route allows no HEAD).
"""

from __future__ import annotations

import orjson
from billing_events.timeutil import utcnow
from billing_projections import views
from billing_projections.balance_cache import BalanceCache
from billing_runtime.auth import authenticate, check_tenant
from billing_runtime.db import Database
from billing_runtime.problems import Problem
from fastapi import HTTPException
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

PATH = "/v1/accounts/{tenant}/balance"
_JSON = (b"content-type", b"application/json")


def unknown_account(tenant: str) -> Problem:
    return Problem(404, "Not found", f"No billing account for tenant {tenant!r}.", kind="unknown-account")


class BalanceEndpoint:
    """A raw ASGI app for a Starlette ``Route`` (path parameters already parsed into the scope)."""

    def __init__(self, db: Database, cache: BalanceCache | None = None) -> None:
        self._db = db
        self._cache = cache  # PostgreSQL: the API's copy of balance states (balance_cache.py)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":  # as FastAPI's GET-only route: 405 problem with Allow: GET
            raise HTTPException(status_code=405, headers={"Allow": "GET"})
        tenant: str = scope["path_params"]["tenant"]
        check_tenant(authenticate(Request(scope)), tenant)
        cache = self._cache
        view = await (views.balance_view(self._db, tenant, utcnow()) if cache is None
                      else cache.view(tenant, utcnow()))
        if view is None:
            raise unknown_account(tenant)
        body = orjson.dumps(view)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), _JSON]})
        await send({"type": "http.response.body", "body": body})
