"""``POST /v1/billing/cycle/run?at=`` ticks what was due by ``at``: a past ``at`` catches up, a future one is refused.

Review (session 13): ticking at Dec 1 on Nov 22 renewed an account early (December invoiced, November's credits
expired) and rating then took the usage of now as late (``late:priced``) into the period after."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import pytest
from billing_events import topics
from billing_events.catalog import EXAMPLE
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient

from tests.unit.subscriptions.test_subscriptions import open_account, run

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}
CYCLE = "/v1/billing/cycle/run"


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    run(app, "catalog.publish", None, document=EXAMPLE, digest="cycle-1")
    open_account(app, "acme")
    yield app
    app.close()


@pytest.fixture
def client(ledger: LedgerApplication, tmp_path: Path) -> Iterator[TestClient]:
    bus = EmbeddedBus(tmp_path / "bus.sqlite")  # where the ticks go, as in `billing run`
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, bus, "billing"))
    api.router.add_event_handler("startup", bus.start)
    api.router.add_event_handler("shutdown", bus.stop)
    with TestClient(api) as http:
        yield http


def subscribe(ledger: LedgerApplication, days_ago: int) -> None:
    start = (utcnow() - timedelta(days=days_ago)).replace(microsecond=0)
    command = LedgerCommand(command_id=uuid4(), kind="subscription.create", tenant="acme", issued_at=start,
                            issued_by="user:test", payload={"key": "main", "plan": "starter", "trial": False})
    [result] = ledger.apply_commands([command])
    assert result.outcome == "applied", result


def ticks_sent(tmp_path: Path) -> int:
    if not (tmp_path / "bus.sqlite").exists():
        return 0
    with sqlite3.connect(tmp_path / "bus.sqlite") as bus:
        return int(bus.execute("SELECT COUNT(*) FROM messages WHERE topic = ?", (topics.LEDGER_COMMANDS,))
                   .fetchone()[0])


def test_a_tick_at_a_future_period_end_is_refused_and_nothing_is_renewed(ledger: LedgerApplication,
                                                                         client: TestClient, tmp_path: Path) -> None:
    subscribe(ledger, days_ago=10)  # its first period ends in about 20 days
    end = ledger.read(subscription_id("acme", "main"), lambda s: s.period_end)
    early = client.post(CYCLE, params={"at": (end + timedelta(seconds=1)).isoformat()}, headers=ADMIN)
    assert (early.status_code, early.headers["content-type"]) == (422, PROBLEM_MEDIA_TYPE), early.text
    assert early.json()["type"] == PROBLEM_BASE + "at-in-the-future"
    assert ticks_sent(tmp_path) == 0  # it published a renewal tick for the period not ended yet
    now = client.post(CYCLE, headers=ADMIN)
    assert (now.status_code, now.json()["ticked"]) == (200, [])  # nothing is due yet


def test_a_tick_at_a_past_moment_or_now_ticks_what_was_due(ledger: LedgerApplication, client: TestClient,
                                                           tmp_path: Path) -> None:
    subscribe(ledger, days_ago=33)  # its first period ended a few days ago, not ticked yet
    end = ledger.read(subscription_id("acme", "main"), lambda s: s.period_end)
    assert end < utcnow()
    before_end = client.post(CYCLE, params={"at": (end - timedelta(seconds=1)).isoformat()}, headers=ADMIN)
    assert (before_end.status_code, before_end.json()["ticked"]) == (200, [])
    caught_up = client.post(CYCLE, params={"at": end.isoformat()}, headers=ADMIN)
    assert caught_up.json()["ticked"] == [{"tenant": "acme", "key": "main"}]
    assert ticks_sent(tmp_path) == 1
    skewed = client.post(CYCLE, params={"at": (utcnow() + timedelta(seconds=60)).isoformat()}, headers=ADMIN)
    assert skewed.status_code == 200  # a clock a minute ahead is not the future
