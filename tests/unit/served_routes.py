"""The routes of the four services as ``billing run`` serves them, and requests no route accepts: what the route
walkers (``test_*_routes_refuse_first.py``) send to every route, so a new route is covered without being listed."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from billing_cli.main import SERVICES, _builders, _bus
from billing_runtime.runner import Runner
from billing_runtime.settings import Settings
from starlette.routing import BaseRoute, Route

UUID_TEXT = "6f1c2a9e-0b7d-4d3e-9a51-2c8f0e7b4a10"
# Every query parameter a route might validate, each with a value no route accepts (a number out of range, a
# malformed moment): sent to every route, so a route that validates its query before its refusal answers 422.
BAD_QUERY = {"limit": "-5", "year": "abc", "month": "99", "at": "not-a-time", "quantity": "many",
             "plan_version": "x", "granularity": "century", "cursor": "%%%", "from": "x", "to": "y", "unit": "?",
             "amount": "lots", "format": "pdf"}
BAD_BODIES = [b"{not json", b'{"amount": "NaN", "idempotency_key": 5}', b"[]"]


@asynccontextmanager
async def serving(data_dir: Path) -> AsyncIterator[tuple[Runner, Settings]]:
    """The four services in one app, as ``billing run`` starts them (no port: requests go to ``runner.app``)."""
    settings = Settings(data_dir=data_dir)
    runner = Runner(settings, _bus(settings), _builders(SERVICES), "billing", None)
    await runner.start()
    try:
        yield runner, settings
    finally:
        await runner.stop()


def service_routes(runner: Runner) -> list[BaseRoute]:
    """Every route the services declare (not the app's own: health, metrics, the OpenAPI document)."""
    return [route for part in runner.parts for router in part.routers for route in router.routes]


def methods_of(route: BaseRoute) -> list[str]:
    """The methods a route answers (HEAD left out); none for the lean hold and balance handlers, whose FastAPI
    routes of the same path are walked instead."""
    if not isinstance(route, Route) or route.methods is None:
        return []
    return sorted(route.methods - {"HEAD"})


def concrete(template: str, tenant: str) -> str:
    """The path with ``tenant`` as its tenant and values that pass no parameter's validation where a converter
    allows it (a uuid where the route's converter only matches one)."""
    def value(match: re.Match[str]) -> str:
        name, _, convertor = match.group(1).partition(":")
        if name == "tenant":
            return tenant
        return UUID_TEXT if convertor == "uuid" else "bad value"

    return re.sub(r"\{([^}]+)\}", value, template).replace(" ", "%20")
