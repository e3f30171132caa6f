"""``POST /v1/accounts/{tenant}/holds``, the ledger's hottest route, as a small ASGI handler.

A caller asks "may I spend this?" before every expensive job, so this route is where the ledger's latency
target lies (a decision under 5 ms p99 at 200 holds/s). Through FastAPI's request handling (the request
object, dependency solving with the body's validation, the endpoint's wrappers) a hold cost the ledger's
event loop about 1 ms of CPU around the decision itself; served here, a fraction of that (figures in
docs/CHANGELOG.md and the ledger's benchmark, ``tests/bench/bench_ledger.py``).

The route is declared twice in ``http.build_router``: this handler first, which receives every request to
the path, then the FastAPI route, which describes it in the OpenAPI document, is the reference it is tested
against (tests/unit/ledger/test_hold_route.py: the same status, headers and bytes) and **answers every
request this handler does not take on**. This handler takes only the plain case: a POST with a body declared
``application/json`` that is a valid ``HoldRequest``, a tenant that matches its pattern, and a bearer token of a
role that may hold for that tenant. Anything else (another method, a malformed tenant or body, another or no
content type, a missing, bad or insufficient token) is handed, with the body read so far, to the FastAPI route, so every
error is the reference's own answer, word for word. The decision and its refusals (problem+json raised by
the shared ``place``) are the same code for both.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from billing_events.messages import TENANT_PATTERN
from billing_ledger.http_models import HoldRequest
from billing_runtime.auth import Principal, Role, authenticate
from billing_runtime.body_limit import replay_body
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

PATH = "/v1/accounts/{tenant}/holds"
SPENDERS = (Role.SERVICE, Role.ADMIN)
Place = Callable[[str, HoldRequest, Principal], Awaitable[tuple[dict[str, Any], int]]]

_TENANT = re.compile(TENANT_PATTERN)
_JSON = (b"content-type", b"application/json")


class HoldEndpoint:
    """A raw ASGI app for a Starlette ``Route`` (path parameters already parsed into the scope); ``reference``
    (the FastAPI route of the same path, set once it is declared) answers what this one does not take on."""

    def __init__(self, place: Place) -> None:
        self._place = place
        self.reference: APIRoute | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        if scope["method"] == "POST":
            body = await _read_body(receive)
            taken = self._take(scope, body)
            if taken is not None:
                view, status = await self._place(*taken)
                payload = orjson.dumps(view)
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-length", str(len(payload)).encode()), _JSON]})
                await send({"type": "http.response.body", "body": payload})
                return
            receive = replay_body(body, receive)
        await self._refer(scope, receive, send)

    def _take(self, scope: Scope, body: bytes) -> tuple[str, HoldRequest, Principal] | None:
        """(tenant, request, principal) when the request is the plain case, else None (see the module doc)."""
        tenant: str = scope["path_params"]["tenant"]
        if not _TENANT.fullmatch(tenant) or not _json_content(scope):
            return None
        try:
            request = HoldRequest.model_validate(orjson.loads(body))
            principal = authenticate(Request(scope))
        except Exception:  # noqa: BLE001 - bad JSON, an invalid body, no or a bad token: the reference explains it
            return None
        if principal.role not in SPENDERS or not principal.can_see(tenant):
            return None
        return tenant, request, principal

    async def _refer(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.reference
        assert route is not None, "HoldEndpoint.reference is set by build_router"
        _, child = route.matches(scope)  # the scope the router would have given the FastAPI route
        await route.handle({**scope, **child}, receive, send)


def _json_content(scope: Scope) -> bool:
    """Whether the body is declared ``application/json`` (parameters allowed), which FastAPI reads as JSON.
    Other JSON types (``+json``) and a body without a content type are left to the reference."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: the reference sees the same
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
