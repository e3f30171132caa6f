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
a larger limit is enforced here and a smaller one by the route as it reads (it raises ``BodyTooLarge``, answered the
same way, as ``POST /v1/webhooks/{gateway}`` does).

How a refused body is answered (``refuse``): the whole 413 is sent at once, before any more of the body is read,
then what the client still sends of the body is read and dropped, then the connection is closed. The answer is
sent as a response still open (``more_body``), which keeps the server reading the request, and completed (the
connection then closes: ``Connection: close``) once the rest is dropped:

- A client that reads while it sends (curl, browsers, a plain socket) has the answer at once and stops.
- A client that reads nothing before it has sent its whole body (httpx's async client) reads it once it has: the
  rest is dropped while it comes, one chunk at a time and kept nowhere, at most ``REFUSED_BODY_DRAIN_BYTES_MAX``
  bytes and ``REFUSED_BODY_DRAIN_SECONDS_MAX`` seconds. Before, the connection was closed with the body unread:
  the kernel reset it, and such a client, still sending, saw the reset (httpx: ``ReadError``), never the 413.
- A body declared larger than ``REFUSED_BODY_DRAIN_BYTES_MAX`` is not read to its end (a client that reads only
  after sending 200 MB cannot be answered without reading them): what comes after its answer is dropped for at
  most ``REFUSED_BODY_LINGER_BYTES_MAX`` bytes and ``REFUSED_BODY_LINGER_SECONDS_MAX`` seconds, the time for the
  answer to reach the client before the connection closes (closing with unread data sends a reset, and a reset
  may discard an answer not yet read), or less if the client closes first.
- A client waiting for ``100 Continue`` before it sends its body is answered and the connection closed: it sends
  nothing more.

Before, the rest was read first and the answer sent after: a client that declared a body and sent it slowly, or
not at all, waited up to 10 s for the 413 while the server held the connection.

A pure ASGI middleware, not Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``): that runs every request in an
anyio task group whose cancellation leaves cyclic garbage per request, and the collections that free it pause the
server (tests/bench/bench_ledger.py, ``ServerTime``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from re import Pattern

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing_runtime.problems import payload_too_large, problem_response

# How much of a refused body is read (and dropped) after its 413, so that a client that reads only once it has sent
# the body gets the answer rather than a reset connection: far above every route's limit (usage batches: 4 MiB), far
# below what would keep a worker busy for long.
REFUSED_BODY_DRAIN_BYTES_MAX = 64 * 1024 * 1024
REFUSED_BODY_DRAIN_SECONDS_MAX = 10.0
# A body declared larger than that: what is dropped after its 413 before the connection closes, the time for the
# answer to reach the client (a close with unread data resets the connection).
REFUSED_BODY_LINGER_BYTES_MAX = 1024 * 1024
REFUSED_BODY_LINGER_SECONDS_MAX = 2.0


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
                            await refuse(scope, receive, send, limit, unread=declared, body_started=False)
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
                await refuse(scope, receive, send, limit, unread=None if message.get("more_body", False) else 0,
                             body_started=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay_body(b"".join(chunks), receive), send)


class BodyTooLarge(Exception):
    """Raised by a route that finds its body over its own ``limit`` as it reads it (ingest's webhooks): answered as
    ``BodyLimit`` answers (``refuse``), by the handler ``billing_runtime.http`` installs. ``unread`` and
    ``body_started`` as for ``BodyRefusal``."""

    def __init__(self, limit: int, *, unread: int | None, body_started: bool) -> None:
        super().__init__(f"the request body is over {limit} bytes")
        self.limit = limit
        self.unread = unread
        self.body_started = body_started


async def body_too_large(request: Request, exc: Exception) -> Response:
    """The exception handler of ``BodyTooLarge``."""
    assert isinstance(exc, BodyTooLarge)
    return BodyRefusal(exc.limit, request.url.path, unread=exc.unread, body_started=exc.body_started)


class BodyRefusal(Response):
    """The 413 problem+json of a body over ``limit`` bytes (``Connection: close``), sent as ``refuse`` says: the whole
    answer at once, then the rest of the body dropped (``drop_rest``), then the response completed, which closes
    the connection. ``unread``: the declared length not read yet (None: unknown, 0: nothing left); ``body_started``:
    the app has asked for the body (a client waiting for ``100 Continue`` has been told to send it)."""

    def __init__(self, limit: int, path: str, *, unread: int | None, body_started: bool) -> None:
        problem = payload_too_large(limit)
        answer = problem_response(problem.status, problem.title, problem.detail, kind=problem.kind, instance=path)
        super().__init__(answer.body, status_code=problem.status, headers={"connection": "close"},
                         media_type=answer.media_type)
        self.unread = unread
        self.body_started = body_started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        # Still open (``more_body``): the server sends these bytes now and goes on reading the request.
        await send({"type": "http.response.body", "body": self.body, "more_body": True})
        if self.unread != 0:
            await drop_rest(scope, receive, unread=self.unread, body_started=self.body_started)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def refuse(scope: Scope, receive: Receive, send: Send, limit: int, *, unread: int | None,
                 body_started: bool) -> None:
    """Answers a request whose body is over ``limit`` with its ``BodyRefusal``."""
    await BodyRefusal(limit, scope["path"], unread=unread, body_started=body_started)(scope, receive, send)


async def drop_rest(scope: Scope, receive: Receive, *, unread: int | None, body_started: bool) -> None:
    """Reads and drops what the client still sends of a refused body, one chunk at a time, until it ends or the
    client goes, within ``REFUSED_BODY_DRAIN_*`` (``REFUSED_BODY_LINGER_*`` for a body declared larger than the
    drain's bytes)."""
    if not body_started:
        for name, value in scope["headers"]:
            if name == b"expect" and value.lower() == b"100-continue":
                return  # the client waits for a go-ahead before it sends the body: it sends nothing
    if unread is not None and unread > REFUSED_BODY_DRAIN_BYTES_MAX:
        bytes_max, seconds_max = REFUSED_BODY_LINGER_BYTES_MAX, REFUSED_BODY_LINGER_SECONDS_MAX
    else:
        bytes_max, seconds_max = REFUSED_BODY_DRAIN_BYTES_MAX, REFUSED_BODY_DRAIN_SECONDS_MAX
    dropped = 0
    try:
        async with asyncio.timeout(seconds_max):
            while dropped <= bytes_max:
                message = await receive()
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


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
