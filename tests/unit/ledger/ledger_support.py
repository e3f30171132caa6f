"""A real LedgerApplication on SQLite in a temporary directory, its HTTP routes, tokens and set-up commands."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.http import create_app
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

SETTINGS = Settings()


@pytest.fixture
def app(tmp_path: Path) -> Iterator[LedgerApplication]:
    application = LedgerApplication(persistence_env(None, str(tmp_path)))
    yield application
    application.close()


@pytest.fixture
def client(app: LedgerApplication) -> TestClient:
    api = create_app("ledger-test", SETTINGS)
    api.include_router(build_router(app))
    return TestClient(api)


def headers(role: str, tenant: str | None = None, subject: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SETTINGS, role=role, tenant=tenant, subject=subject)}"}


def command(kind: str, tenant: str | None, payload: dict[str, Any], key: str = "",
            issued_at: datetime | None = None) -> LedgerCommand:
    return LedgerCommand(command_id=ids.command_id(kind, tenant or "-", key or str(sorted(payload.items()))),
                         kind=kind, tenant=tenant, issued_at=issued_at or datetime.now(UTC), issued_by="test",
                         payload=payload)


def apply(app: LedgerApplication, *commands: LedgerCommand) -> list[CommandResult]:
    results = app.apply_commands(list(commands))
    return results


def open_account(app: LedgerApplication, tenant: str, *grants: dict[str, Any], currency: str = "USD") -> None:
    """Opens ``tenant``'s account with ``grants`` (``key``, ``amount`` and any ``credit.grant`` fields)."""
    commands = [command("account.open", tenant, {"currency": currency})]
    for grant in grants:
        # Effective long before any usage a test sends (tests use fixed times, the grant's default is "now").
        body = {"unit": currency, "source": "purchase", "effective_at": "2020-01-01T00:00:00+00:00", **grant}
        body["grant_key"] = body.pop("key")
        commands.append(command("credit.grant", tenant, body, key=body["grant_key"]))
    results = apply(app, *commands)
    assert all(r.outcome == "applied" for r in results), results
