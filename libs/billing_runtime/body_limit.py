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

A refused body is read and dropped before the 413 is sent (``discard_rest``): closing a connection with unread data
in it makes the kernel reset it, and the client, still sending, saw the reset (httpx: ``ReadError``), never the 413.
It is read one chunk at a time and kept nowhere, at most ``REFUSED_BODY_DRAIN_BYTES_MAX`` bytes and
``REFUSED_BODY_DRAIN_SECONDS_MAX`` seconds; a body declared larger than that, or a client waiting for ``100
Continue`` (it has not sent the body), is answered at once.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``): that runs every request in an
anyio task group whose cancellation leaves cyclic garbage per request, and the collections that free it pause the
server (tests/bench/bench_ledger.py, ``ServerTime``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from re import Pattern

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_runtime.problems import payload_too_large, problem_response

# How much of a refused body is read (and dropped) so that the client gets the 413 rather than a reset connection:
# far above every route's limit (usage batches: 4 MiB), far below what would keep a worker busy for long.
REFUSED_BODY_DRAIN_BYTES_MAX = 64 * 1024 * 1024
REFUSED_BODY_DRAIN_SECONDS_MAX = 10.0


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
                            await discard_rest(scope, receive, unread=declared)
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
                if message.get("more_body", False):
                    await discard_rest(scope, receive)
                await _refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


async def discard_rest(scope: Scope, receive: Receive, *, unread: int | None = None) -> None:
    """Reads and drops what is left of a refused request's body (the server has more of it: a declared ``unread``
    length not read yet, or a last message with ``more_body``), so that its 413 is read rather than reset; within
    ``REFUSED_BODY_DRAIN_BYTES_MAX`` and ``REFUSED_BODY_DRAIN_SECONDS_MAX``, one chunk at a time."""
    if unread is not None and unread > REFUSED_BODY_DRAIN_BYTES_MAX:
        return  # not worth reading: the client may see a reset
    for name, value in scope["headers"]:
        if name == b"expect" and value.lower() == b"100-continue":
            return  # the client waits for a go-ahead before it sends the body: the 413 comes first
    dropped = 0
    try:
        async with asyncio.timeout(REFUSED_BODY_DRAIN_SECONDS_MAX):
            while dropped <= REFUSED_BODY_DRAIN_BYTES_MAX:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


async def _refuse(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    problem = payload_too_large(limit)
    # What is left of the body is not parsed as a request: the connection closes after the answer.
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
