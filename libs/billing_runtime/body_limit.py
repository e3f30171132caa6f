"""A limit on the request body of every HTTP route, before any of the app reads a byte of it.

Without it, a route reads its whole body before anything else looks at the request (FastAPI parses the body before
it solves the dependencies that check the bearer token): an unauthenticated 200 MB POST was held in memory whole,
only to be answered 401. ``BodyLimit`` answers a request whose ``Content-Length`` is above the limit with 413
problem+json at once, unread; a body of unknown length (``Transfer-Encoding: chunked``) is read up to the limit and
refused as soon as it goes beyond it, else handed to the app as read.

The limit is ``Settings.http_default_body_bytes_max`` unless the service names another for a route
(``ServiceParts.body_limits``, path template -> bytes): ``POST /v1/usage`` takes larger batches, payment webhooks
smaller bodies. A declared ``Content-Length`` is compared with the default (two comparisons per header: the hot
routes, a hold or a balance, pay nothing more), and the route's own limit is looked up only for a length above it, so
a larger limit is enforced here and a smaller one by the route as it reads (its own 413, as
``POST /v1/webhooks/{gateway}`` does). A body of unknown length is held to the route's own limit.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``): that runs every request in an
anyio task group whose cancellation leaves cyclic garbage per request, and the collections that free it pause the
server (tests/bench/bench_ledger.py, ``ServerTime``).
"""

from __future__ import annotations

from collections.abc import Mapping
from re import Pattern

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_runtime.problems import payload_too_large, problem_response


class BodyLimit:
    """``app.add_middleware(BodyLimit, default_bytes_max=..., routes={"/v1/usage": ...})``: ``routes`` maps path
    templates (as the routes declare them, ``/v1/webhooks/{gateway}``) to their own limit."""

    def __init__(self, app: ASGIApp, *, default_bytes_max: int, routes: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.default_bytes_max = default_bytes_max
        self._routes: list[tuple[Pattern[str], int]] = [
            (compile_path(path)[0], limit) for path, limit in (routes or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length":
                    # The server passes only a well-formed length, and never more body than it declares.
                    declared = int(value)
                    if declared > self.default_bytes_max:
                        limit = self._limit_of(scope)
                        if declared > limit:
                            await _refuse(scope, receive, send, limit)
                            return
                    break
                if name == b"transfer-encoding":
                    await self._read_then_call(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _limit_of(self, scope: Scope) -> int:
        """The limit of the route of this request, or the default."""
        path = scope["path"]
        for pattern, limit in self._routes:
            if pattern.match(path):
                return limit
        return self.default_bytes_max

    async def _read_then_call(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A body of unknown length: read up to the limit (never more than one chunk beyond) before the app sees it."""
        limit = self._limit_of(scope)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    problem = payload_too_large(limit)
    # The rest of the body is never read: the connection closes after the answer, not to parse it as a request.
    response = problem_response(problem.status, problem.title, problem.detail, kind=problem.kind,
                                instance=scope["path"], headers={"connection": "close"})
    await response(scope, receive, send)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands a body already read over again as one message, then is the server's own (it
    reports the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
