"""When a subscription command takes effect (its ``at``) is bounded around when it was issued: at most
``EFFECTIVE_AT_BACKDATE_DAYS_MAX`` (35) days before, at most ``EFFECTIVE_AT_SKEW_SECONDS_MAX`` (300 s) after, for
create, change, cancel, pause and resume alike; beyond, ``at_out_of_range`` and nothing changes.

Review (session 13): an ``at`` in 1900 started a subscription billing every month since (INV-1900-000001), one in
2099 numbered INV-2099-000001 at once; a change given a future ``at`` was applied at once with its credit note dated
in the future."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.catalog import EXAMPLE
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import CommandResult, LedgerApplication, persistence_env
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.subscriptions.test_invoice_commands_input import changes_since
from tests.unit.subscriptions.test_subscriptions import CATALOG, NOV_1, open_account, run

NOV_16 = NOV_1 + timedelta(days=15)
ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[LedgerApplication]:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    open_account(ledger, "acme")
    yield ledger
    ledger.close()


def issued(app: LedgerApplication, kind: str, issued_at: datetime, at: datetime, **payload: Any) -> CommandResult:
    """A command issued at ``issued_at`` (as over HTTP or from the CLI: issued now) taking effect at ``at``."""
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant="acme", issued_at=issued_at, issued_by="user:test",
                            payload={"at": at.isoformat(), **payload})
    [result] = app.apply_commands([command])
    return result


def state(app: LedgerApplication) -> tuple[Any, ...]:
    return app.read(subscription_id("acme", "main"), lambda s: (s.status, s.quantity, s.cancel_at_period_end,
                                                                 s.version))


@pytest.mark.parametrize("at", [NOV_16 - timedelta(days=35, seconds=1), NOV_16 + timedelta(seconds=301)])
@pytest.mark.parametrize(("kind", "payload"), [
    ("subscription.change", {"quantity": 2}), ("subscription.cancel", {"immediately": True}),
    ("subscription.cancel", {}), ("subscription.pause", {}),
])
def test_a_lifecycle_command_beyond_the_bounds_is_refused_and_changes_nothing(
        app: LedgerApplication, kind: str, payload: dict[str, Any], at: datetime) -> None:
    assert run(app, "subscription.create", "acme", key="main", plan="team").outcome == "applied"
    before, position = state(app), app.recorder.max_notification_id() or 0
    refused = issued(app, kind, NOV_16, at, key="main", **payload)
    assert (refused.outcome, refused.reason) == ("rejected", "at_out_of_range")
    assert changes_since(app, position) == [] and state(app) == before


def test_a_change_dated_a_day_ahead_is_refused_not_credited_in_the_future(app: LedgerApplication) -> None:
    assert run(app, "subscription.create", "acme", key="main", plan="team", quantity=2).outcome == "applied"
    position = app.recorder.max_notification_id() or 0
    refused = issued(app, "subscription.change", NOV_16, NOV_16 + timedelta(days=1), key="main", quantity=1)
    assert (refused.outcome, refused.reason) == ("rejected", "at_out_of_range")
    assert "nothing is scheduled" in (refused.detail or "")
    assert changes_since(app, position) == []  # no credit note dated Nov 17 (it was issued on Nov 16)
    # Within the clock skew, or as far back as the window goes, it is applied.
    assert issued(app, "subscription.change", NOV_16, NOV_16 + timedelta(seconds=300), key="main",
                  quantity=1).outcome == "applied"
    assert issued(app, "subscription.change", NOV_16, NOV_16 - timedelta(days=14), key="main",
                  quantity=2).outcome == "applied"


def test_a_resume_dated_decades_back_is_refused(app: LedgerApplication) -> None:
    assert run(app, "subscription.create", "acme", key="main", plan="team").outcome == "applied"
    assert run(app, "subscription.pause", "acme", at=NOV_1 + timedelta(days=2), key="main").outcome == "applied"
    refused = issued(app, "subscription.resume", NOV_16, datetime.fromisoformat("1900-01-01T00:00:00+00:00"),
                     key="main")
    assert (refused.outcome, refused.reason) == ("rejected", "at_out_of_range")
    assert state(app)[0] == "paused"


def test_a_subscription_may_start_up_to_35_days_back(app: LedgerApplication) -> None:
    start = NOV_16 - timedelta(days=35)
    created = issued(app, "subscription.create", NOV_16, start, key="main", plan="team", trial=False)
    assert created.outcome == "applied", created
    assert app.read(subscription_id("acme", "main"), lambda s: s.period_start) == start


@pytest.fixture
def client(tmp_path: Path) -> Iterator[tuple[LedgerApplication, TestClient]]:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path / "http")))
    run(ledger, "catalog.publish", None, document=EXAMPLE, digest="bounds-1")
    open_account(ledger, "acme")
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    yield ledger, TestClient(api)
    ledger.close()


@pytest.mark.parametrize("at", ["1900-01-01T00:00:00+00:00", "2099-01-01T00:00:00+00:00"])
def test_over_http_such_an_at_is_a_problem_and_nothing_is_recorded(client: tuple[LedgerApplication, TestClient],
                                                                   at: str) -> None:
    ledger, http = client
    position = ledger.recorder.max_notification_id() or 0
    refused = http.post("/v1/accounts/acme/subscriptions", headers=ADMIN,
                        json={"key": "main", "plan": "starter", "trial": False, "at": at})
    assert (refused.status_code, refused.headers["content-type"]) == (422, PROBLEM_MEDIA_TYPE), refused.text
    assert refused.json()["type"] == PROBLEM_BASE + "at-out-of-range"
    assert ledger.recorder.max_notification_id() == position  # no roster, no subscription, no INV-1900-000001


def test_over_http_a_change_dated_a_day_ahead_is_a_problem_and_changes_nothing(
        client: tuple[LedgerApplication, TestClient]) -> None:
    ledger, http = client
    assert http.post("/v1/accounts/acme/subscriptions", headers=ADMIN,
                     json={"key": "main", "plan": "starter", "trial": False}).status_code == 201
    position = ledger.recorder.max_notification_id() or 0
    ahead = (utcnow() + timedelta(days=1)).isoformat()
    changed = http.post("/v1/accounts/acme/subscriptions/main/change", headers=ADMIN,
                        json={"quantity": 2, "at": ahead})
    assert (changed.status_code, changed.json()["type"]) == (422, PROBLEM_BASE + "at-out-of-range"), changed.text
    assert ledger.recorder.max_notification_id() == position  # no invoice dated tomorrow
    assert http.get("/v1/accounts/acme/subscriptions/main", headers=ADMIN).json()["quantity"] == 1
