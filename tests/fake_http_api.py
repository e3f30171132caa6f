"""A gateway's HTTP API faked on a local port (a thread of ``http.server``), for services started as processes
(``billing run``, ``billing serve``), which the SDKs' in-process fakes (``httpx.MockTransport``, a
``stripe.HTTPClient``) cannot reach: the service is pointed at it by its ``BILLING_<GATEWAY>_API_BASE``."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]  # an application/x-www-form-urlencoded body (Stripe's), else empty
    json: Any  # a JSON body, else None
    headers: dict[str, str]


Answer = Callable[[Request], tuple[int, Any]]


@dataclass
class FakeApi:
    """``answer(request) -> (status, JSON body)``; every request is kept in ``requests``."""

    answer: Answer
    requests: list[Request] = field(default_factory=list)
    base: str = ""


@contextmanager
def serve(answer: Answer) -> Iterator[FakeApi]:
    api = FakeApi(answer)

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            url = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            kind = self.headers.get("Content-Type") or ""
            request = Request(self.command, url.path, parse_qs(url.query),
                              parse_qs(raw.decode()) if "form-urlencoded" in kind else {},
                              json.loads(raw) if raw and "json" in kind else None,
                              {k.lower(): v for k, v in self.headers.items()})
            api.requests.append(request)
            status, body = api.answer(request)
            content = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_DELETE = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    api.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-http-api", daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
