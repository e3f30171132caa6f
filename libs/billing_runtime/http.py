"""The pieces every HTTP app shares: problem handlers, auth state, the request body limit, /healthz, /readyz and
/metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from billing_runtime.auth import TokenVerifier, refused_first
from billing_runtime.body_limit import BodyLimit, BodyTooLarge, body_too_large
from billing_runtime.problems import install_problem_handlers, problem_response
from billing_runtime.settings import Settings

ReadyCheck = Callable[[], Awaitable[bool]]


def create_app(title: str, settings: Settings, ready: ReadyCheck | None = None, version: str = "0.1.0",
               body_limits: Mapping[str, int] | None = None) -> FastAPI:
    """``body_limits``: routes whose request body limit is not the default (``ServiceParts.body_limits``)."""
    app = FastAPI(title=title, version=version)
    app.state.token_verifier = TokenVerifier(settings)
    install_problem_handlers(app, refuse_first=refused_first)
    app.add_middleware(BodyLimit, default_bytes_max=settings.http_default_body_bytes_max, routes=body_limits)
    app.add_exception_handler(BodyTooLarge, body_too_large)  # a route's own, smaller limit (ingest's webhooks)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        if ready is not None and not await ready():
            return problem_response(503, "Not ready", "Dependencies are not ready yet.", kind="not-ready")
        return Response('{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
