"""Every service's HTTP app limits request bodies before any route reads them (billing_runtime.body_limit): a
declared length above the limit is answered 413 problem+json without the app reading it, a body of unknown length is
cut off at the limit, and bodies within it reach the routes as sent. A refused body is answered at once, then what
the client still sends of it is read and dropped, within bounds, so that a real client reads the 413 (uvicorn with
httpx and with a plain socket, at the end). Served by the ledger's real routes (its hot hold route too)."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from billing_cli.catalog import load_document
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.http import build_router
from billing_runtime.body_limit import (
    REFUSED_BODY_DRAIN_BYTES_MAX,
    REFUSED_BODY_LINGER_BYTES_MAX,
    REFUSED_BODY_LINGER_SECONDS_MAX,
)
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi import FastAPI

from tests.support import free_port
from tests.unit.ledger.ledger_support import SETTINGS, headers, open_account

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LIMIT = 2048
ADJUSTMENTS = "/v1/accounts/acme/adjustments"
HOLDS = "/v1/accounts/acme/holds"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FastAPI]:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    open_account(ledger, "acme", {"key": "g1", "amount": "100.00"})
    app = create_app("ledger-test", Settings(http_default_body_bytes_max=LIMIT))
    app.include_router(build_router(ledger))
    yield app
    ledger.close()


async def call(app: FastAPI, path: str, chunks: Sequence[bytes], head: dict[str, str]) -> dict[str, Any]:
    """One POST as the server hands it to the app, ``chunks`` one ``http.request`` message each; the answer, how
    many of the chunks the app asked for, and how many it had asked for when it answered."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("test", 80), "client": ("client", 1),
             "headers": [(b"host", b"test")] + [(k.lower().encode(), v.encode()) for k, v in head.items()]}
    read = 0
    read_before_answer: int | None = None
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read == len(chunks):
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        nonlocal read_before_answer
        if message["type"] == "http.response.start":
            read_before_answer = read
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "headers": {k.decode(): v.decode() for k, v in start["headers"]},
            "body": json.loads(body), "chunks_read": read, "read_before_answer": read_before_answer}


def _too_large(answer: dict[str, Any], path: str) -> None:
    assert answer["status"] == 413
    assert answer["headers"]["content-type"] == "application/problem+json"
    assert answer["headers"]["connection"] == "close"
    assert answer["body"] == {"type": "https://billing.dev/problems/payload-too-large", "title": "Payload too large",
                              "status": 413, "detail": f"Bodies are limited to {LIMIT} bytes.", "instance": path}


async def test_a_declared_length_above_the_limit_is_refused_before_the_token_is_looked_at(api: FastAPI) -> None:
    # No token: the route would read the whole body only to answer 401 (a 200 MB body was held in memory whole).
    # The 413 is sent before a byte of the body is read; the body is read and dropped chunk by chunk after it (a
    # client that reads only once it has sent the body reads the answer, not a reset).
    chunks = [b"x" * 1024] * 1000
    answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json",
                                                   "content-length": str(1024 * 1000)})
    _too_large(answer, ADJUSTMENTS)
    assert answer["read_before_answer"] == 0 and answer["chunks_read"] == 1000
    # The hot hold route too, with a valid token.
    answer = await call(api, HOLDS, [b" " * (LIMIT + 1)], {**headers("service"), "content-type": "application/json",
                                                            "content-length": str(LIMIT + 1)})
    _too_large(answer, HOLDS)
    assert answer["read_before_answer"] == 0 and answer["chunks_read"] == 1
    # A body declared beyond what is worth reading: after its answer, at most REFUSED_BODY_LINGER_BYTES_MAX of it.
    beyond = [b"x" * 65536] * 64  # 4 MiB sent of a body declared 64 MiB + 1
    answer = await call(api, ADJUSTMENTS, beyond, {"content-type": "application/json",
                                                   "content-length": str(REFUSED_BODY_DRAIN_BYTES_MAX + 1)})
    _too_large(answer, ADJUSTMENTS)
    assert answer["read_before_answer"] == 0
    assert answer["chunks_read"] == REFUSED_BODY_LINGER_BYTES_MAX // 65536 + 1
    # One the client sends only after 100 Continue: never asked for.
    answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json",
                                                   "content-length": str(LIMIT + 1), "expect": "100-continue"})
    _too_large(answer, ADJUSTMENTS)
    assert answer["chunks_read"] == 0


async def test_a_body_of_unknown_length_is_cut_off_at_the_limit(api: FastAPI) -> None:
    chunks = [b"x" * 1000] * 1000  # 1 MB, chunked: no length declared
    answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
    _too_large(answer, ADJUSTMENTS)
    # Refused at the first chunk beyond the limit, the rest read and dropped after the answer.
    assert answer["read_before_answer"] == 3 and answer["chunks_read"] == 1000


async def test_bodies_within_the_limit_reach_the_routes_as_sent(api: FastAPI) -> None:
    adjustment = json.dumps({"idempotency_key": "adj-1", "amount": "5.00", "reason": "goodwill"}).encode()
    adjustment = b"{" + b" " * (LIMIT - len(adjustment)) + adjustment[1:]  # insignificant whitespace
    assert len(adjustment) == LIMIT
    admin = {**headers("admin"), "content-type": "application/json"}
    answer = await call(api, ADJUSTMENTS, [adjustment], {**admin, "content-length": str(len(adjustment))})
    assert answer["status"] == 201, answer
    hold, chunked = (json.dumps({"idempotency_key": key, "amount": "30.00"}).encode() for key in ("job-1", "job-2"))
    for chunks, framing in (([hold], {"content-length": str(len(hold))}),
                            ([chunked[:9], chunked[9:30], chunked[30:]], {"transfer-encoding": "chunked"})):
        answer = await call(api, HOLDS, chunks, {**admin, **framing})
        assert answer["status"] == 201, answer
        assert answer["body"]["approved"] is True and answer["body"]["amount"] == "30.00"


def test_the_default_limit_is_a_setting_far_above_the_largest_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SETTINGS.http_default_body_bytes_max == 1024 * 1024
    for name in ("catalog.yaml", "demo-catalog.yaml"):  # POST /v1/catalog's body, as `billing catalog apply` reads it
        document = load_document(EXAMPLES / name)["catalog"]
        assert len(json.dumps(document).encode()) * 100 < SETTINGS.http_default_body_bytes_max
    monkeypatch.setenv("BILLING_HTTP_DEFAULT_BODY_BYTES_MAX", "65536")
    assert Settings.from_env().http_default_body_bytes_max == 65536


@pytest.fixture
async def server(api: FastAPI) -> AsyncIterator[str]:
    """The app served by uvicorn on a local port (as ``billing serve`` does): its base URL."""
    port = free_port()
    served = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="off"))
    task = asyncio.create_task(served.serve())
    while not served.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    await task


async def test_a_client_sending_a_body_over_the_limit_reads_the_413(server: str) -> None:
    """Before, the server answered and closed the connection with the body unread: the kernel reset it, and httpx,
    still sending 8 MB, raised ``ReadError`` instead of reading the 413. Declared or chunked, it now reads the
    problem, and the next request (a new connection) is served."""

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(128):
            yield b"x" * 65536

    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        for content in (b"x" * (8 * 1024 * 1024), chunked()):
            response = await client.post(ADJUSTMENTS, content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == 413
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["detail"] == f"Bodies are limited to {LIMIT} bytes."
        assert (await client.get("/healthz")).status_code == 200


def _raw_post(base: str, declared: int, sending: str) -> dict[str, Any]:
    """A POST from a plain socket declaring ``declared`` bytes of body, then sending ``sending``: ``"nothing"``,
    ``"slowly"`` (1 KiB every 20 ms, reading as it goes) or ``"all"`` (as fast as the server takes it, reading only
    once it may send no more, as a client does that reads the answer after its request). How long the answer took,
    the answer, how much of the body went out and, for a body declared beyond the drain bound, how long until the
    server closed the connection and what came after the answer before that."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(f"POST {ADJUSTMENTS} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        sent = 0
        if sending == "all":
            try:
                while sent < declared:
                    sent += sock.send(b"x" * 65536)
            except OSError:  # the server closed the connection
                pass

        def step(deadline: float) -> bytes | None:
            """Sends the next slow kilobyte, then what arrived within 20 ms (b"" at the end of the stream, None if
            nothing)."""
            nonlocal sent, sending
            if time.monotonic() > deadline:
                raise TimeoutError
            if sending == "slowly":
                try:
                    sock.sendall(b"x" * 1024)
                    sent += 1024
                except OSError:
                    sending = "nothing"
            if not select.select([sock], [], [], 0.02)[0]:
                return None
            try:
                return sock.recv(65536)
            except ConnectionResetError:  # closed with data left unread: the answer came before
                return b""

        received = b""
        deadline = started + 5
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _length(received):
            data = step(deadline)
            if data == b"":
                break
            received += data or b""
        answered = time.monotonic() - started
        head, _, body = received.partition(b"\r\n\r\n")
        rest, closed = b"", None
        if declared > REFUSED_BODY_DRAIN_BYTES_MAX:  # else what the client sends is dropped as it comes: not waited
            deadline = time.monotonic() + REFUSED_BODY_LINGER_SECONDS_MAX + 5
            while (data := step(deadline)) != b"":
                rest += data or b""
            closed = time.monotonic() - started
    return {"head": head.decode(), "body": json.loads(body[:_length(received)]), "answered_s": answered,
            "closed_s": closed, "sent": sent, "rest": rest}


def _length(received: bytes) -> int:
    head = received.partition(b"\r\n\r\n")[0]
    return next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                 if line.lower().startswith(b"content-length:")), 1 << 30)


@pytest.mark.parametrize(("declared", "sending"), [
    (200_000_000, "nothing"), (200_000_000, "slowly"), (200_000_000, "all"),
    (10_000_000, "nothing"), (10_000_000, "slowly")])
async def test_a_body_over_the_limit_is_answered_at_once_whatever_the_client_sends(
        server: str, declared: int, sending: str) -> None:
    """A plain socket declares a body over the limit, then sends it slowly, not at all, or as fast as it can. It
    gets the 413 problem+json at once, then the connection is closed without the server reading the body: at most
    ``REFUSED_BODY_LINGER_BYTES_MAX`` of a body declared beyond ``REFUSED_BODY_DRAIN_BYTES_MAX``. Before, a body
    declared within the drain bound was read to its end before the answer: a client sending 10 MB slowly, or not at
    all, had no answer for 10 s while the server held the connection."""
    answer = await asyncio.to_thread(_raw_post, server, declared, sending)
    assert answer["head"].startswith("HTTP/1.1 413 ")
    assert "\r\ncontent-type: application/problem+json" in answer["head"]
    assert "\r\nconnection: close" in answer["head"]
    assert answer["body"]["type"] == "https://billing.dev/problems/payload-too-large"
    assert answer["answered_s"] < 2, answer
    if declared > REFUSED_BODY_DRAIN_BYTES_MAX:
        assert answer["rest"] == b""  # nothing after the answer: the connection was closed
        assert answer["closed_s"] < REFUSED_BODY_LINGER_SECONDS_MAX + 2, answer
        # What went out before the close: what was dropped after the answer, and what the kernels' buffers took.
        assert answer["sent"] < 32 * 1024 * 1024, answer
