"""RFC 9457 problem+json errors for every HTTP app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://billing.dev/problems/"


class Problem(Exception):
    """Raise anywhere in a request to answer with a problem+json body; nothing has been changed."""

    def __init__(self, status: int, title: str, detail: str = "", *, kind: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.headers = headers or {}
        self.extra = extra


def payload_too_large(limit: int) -> Problem:
    """A request body above ``limit`` bytes (``billing_runtime.body_limit``, ``POST /v1/usage``, webhooks)."""
    return Problem(413, "Payload too large", f"Bodies are limited to {limit} bytes.", kind="payload-too-large")


def problem_response(status: int, title: str, detail: str = "", *, kind: str | None = None,
                     instance: str | None = None, headers: dict[str, str] | None = None,
                     **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (kind or title.lower().replace(" ", "-")),
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def install_problem_handlers(app: FastAPI, *,
                             refuse_first: Callable[[Request], Awaitable[Problem | None]] | None = None) -> None:
    """``refuse_first``: a refusal that comes before a request's validation errors (no valid bearer token, a token
    that may not act on the route or see its tenant: ``billing_runtime.auth.refused_first``); when it gives a
    problem, that is the answer instead of the 422."""
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, kind=exc.kind, instance=request.url.path,
                                headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        refusal = await refuse_first(request) if refuse_first is not None else None
        if refusal is not None:
            return await _problem(request, refusal)
        errors = [
            {"location": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        return problem_response(422, "Invalid request", "The request does not match the schema.",
                                kind="invalid-request", instance=request.url.path, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        titles = {404: "Not found", 405: "Method not allowed", 401: "Unauthorized", 403: "Forbidden"}
        return problem_response(exc.status_code, titles.get(exc.status_code, "HTTP error"), str(exc.detail),
                                instance=request.url.path, headers=getattr(exc, "headers", None))
