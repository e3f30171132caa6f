"""Every service's HTTP app limits request bodies before any route reads them (billing_runtime.body_limit): a
declared length above the limit is answered 413 problem+json without the app reading it, a body of unknown length is
cut off at the limit, and bodies within it reach the routes as sent. A refused body is read and dropped before the
answer, within bounds, so that a real client reads the 413 (uvicorn and httpx, at the end). Served by the ledger's
real routes (its hot hold route too)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from billing_cli.catalog import load_document
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.http import build_router
from billing_runtime.body_limit import REFUSED_BODY_DRAIN_BYTES_MAX
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
    """One POST as the server hands it to the app, ``chunks`` one ``http.request`` message each; the answer and
    how many of the chunks the app asked for."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "server": ("test", 80), "client": ("client", 1),
             "headers": [(b"host", b"test")] + [(k.lower().encode(), v.encode()) for k, v in head.items()]}
    read = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal read
        if read == len(chunks):
            return {"type": "http.disconnect"}
        read += 1
        return {"type": "http.request", "body": chunks[read - 1], "more_body": read < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {"status": start["status"], "headers": {k.decode(): v.decode() for k, v in start["headers"]},
            "body": json.loads(body), "chunks_read": read}


def _too_large(answer: dict[str, Any], path: str) -> None:
    assert answer["status"] == 413
    assert answer["headers"]["content-type"] == "application/problem+json"
    assert answer["headers"]["connection"] == "close"
    assert answer["body"] == {"type": "https://billing.dev/problems/payload-too-large", "title": "Payload too large",
                              "status": 413, "detail": f"Bodies are limited to {LIMIT} bytes.", "instance": path}


async def test_a_declared_length_above_the_limit_is_refused_before_the_token_is_looked_at(api: FastAPI) -> None:
    # No token: the route would read the whole body only to answer 401 (a 200 MB body was held in memory whole).
    # The body is read and dropped chunk by chunk before the 413 (the client reads the answer, not a reset).
    chunks = [b"x" * 1024] * 1000
    answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json",
                                                   "content-length": str(1024 * 1000)})
    _too_large(answer, ADJUSTMENTS)
    assert answer["chunks_read"] == 1000
    # The hot hold route too, with a valid token.
    answer = await call(api, HOLDS, [b" " * (LIMIT + 1)], {**headers("service"), "content-type": "application/json",
                                                            "content-length": str(LIMIT + 1)})
    _too_large(answer, HOLDS)
    assert answer["chunks_read"] == 1
    # A body declared beyond what is worth reading, or one the client sends only after 100 Continue: unread.
    beyond = str(REFUSED_BODY_DRAIN_BYTES_MAX + 1)
    for head in ({"content-length": beyond}, {"content-length": str(LIMIT + 1), "expect": "100-continue"}):
        answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json", **head})
        _too_large(answer, ADJUSTMENTS)
        assert answer["chunks_read"] == 0


async def test_a_body_of_unknown_length_is_cut_off_at_the_limit(api: FastAPI) -> None:
    chunks = [b"x" * 1000] * 1000  # 1 MB, chunked: no length declared
    answer = await call(api, ADJUSTMENTS, chunks, {"content-type": "application/json",
                                                   "transfer-encoding": "chunked"})
    _too_large(answer, ADJUSTMENTS)
    assert answer["chunks_read"] == 1000  # refused at the first chunk beyond the limit, the rest read and dropped


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
