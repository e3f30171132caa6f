"""Workspace membership (seed 004: a trial needs the workspace to have exactly one billing account): joined by naming
the workspace on ``subscription.create``, or by an admin over HTTP or the CLI, and counted for every account of it.

Review (session 13): accounts t7/t8 and t11/t12 (two accounts naming one workspace) each got a 14-day trial: the
name was only looked up, never joined, and the only way to join was a Kafka command no route or CLI sent."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from billing_cli.main import app as cli
from billing_events import topics
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.roster import roster_id, workspace_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.subscriptions_http import build_router
from billing_runtime.auth import mint_token
from billing_runtime.bus import EmbeddedBus
from billing_runtime.http import create_app
from billing_runtime.problems import PROBLEM_BASE, PROBLEM_MEDIA_TYPE
from billing_runtime.settings import Settings
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.unit.subscriptions.test_subscriptions import CATALOG, open_account, run

ADMIN = {"Authorization": f"Bearer {mint_token(Settings(), role='admin')}"}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    app = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    assert run(app, "catalog.publish", None, document=CATALOG, digest="ws-1").outcome == "applied"
    for tenant in ("t7", "t8", "t9"):
        open_account(app, tenant)
    yield app
    app.close()


@pytest.fixture
def client(ledger: LedgerApplication, tmp_path: Path) -> TestClient:
    api = create_app("t", Settings(data_dir=tmp_path))
    api.include_router(build_router(ledger, EmbeddedBus(tmp_path / "bus.sqlite"), "billing"))
    return TestClient(api)


def subscribe(client: TestClient, tenant: str, **body: object) -> tuple[int, dict]:  # type: ignore[type-arg]
    response = client.post(f"/v1/accounts/{tenant}/subscriptions", headers=ADMIN,
                           json={"key": "main", "plan": "trial", **body})
    return response.status_code, response.json()


def test_the_second_account_naming_a_workspace_is_billed_at_once(client: TestClient) -> None:
    status, first = subscribe(client, "t7", workspace="wsX")
    assert (status, first["status"]) == (201, "trialing")
    status, second = subscribe(client, "t8", workspace="wsX")
    assert (status, second["status"], second["trial_end"]) == (201, "active", None)  # it was "trialing" too
    members = client.get("/v1/workspaces/wsX", headers=ADMIN)
    assert (members.status_code, members.json()) == (200, {"workspace": "wsX", "accounts": ["t7", "t8"]})
    assert client.get("/v1/accounts/t8/subscriptions", headers=ADMIN).json()["workspace"] == "wsX"


def test_an_account_added_by_an_admin_counts_for_its_workspace(ledger: LedgerApplication,
                                                               client: TestClient) -> None:
    for tenant in ("t7", "t8"):
        added = client.put(f"/v1/workspaces/acme-corp/accounts/{tenant}", headers=ADMIN)
        assert added.status_code == 200, added.text
    assert added.json() == {"workspace": "acme-corp", "accounts": ["t7", "t8"]}
    # Neither names its workspace when it subscribes: each is a member of one with two accounts, so no trial.
    assert subscribe(client, "t7")[1]["status"] == "active"
    assert subscribe(client, "t9")[1]["status"] == "trialing"  # alone, in no workspace: eligible as before
    again = client.put("/v1/workspaces/acme-corp/accounts/t7", headers=ADMIN)  # a retry changes nothing
    assert again.json()["accounts"] == ["t7", "t8"]


@pytest.mark.parametrize(("url", "status", "kind"), [
    ("/v1/workspaces/a%20b/accounts/t7", 422, "invalid-request"),         # not a path key
    ("/v1/workspaces/" + "w" * 129 + "/accounts/t7", 422, "invalid-request"),
    ("/v1/workspaces/ws/accounts/nobody", 404, "unknown-account"),
])
def test_a_bad_membership_request_gets_its_problem_and_changes_nothing(ledger: LedgerApplication, client: TestClient,
                                                                      url: str, status: int, kind: str) -> None:
    position = ledger.recorder.max_notification_id() or 0
    refused = client.put(url, headers=ADMIN)
    assert (refused.status_code, refused.headers["content-type"]) == (status, PROBLEM_MEDIA_TYPE), refused.text
    assert refused.json()["type"] == PROBLEM_BASE + kind
    assert ledger.recorder.max_notification_id() == position


def test_an_account_belongs_to_one_workspace(ledger: LedgerApplication, client: TestClient) -> None:
    assert client.put("/v1/workspaces/wsY/accounts/t7", headers=ADMIN).status_code == 200
    position = ledger.recorder.max_notification_id() or 0
    moved = client.put("/v1/workspaces/wsZ/accounts/t7", headers=ADMIN)
    assert (moved.status_code, moved.json()["reason"]) == (409, "workspace_mismatch"), moved.text
    # Naming another workspace on create is refused the same way, before anything is subscribed.
    status, refused = subscribe(client, "t7", workspace="wsZ")
    assert (status, refused["reason"]) == (409, "workspace_mismatch")
    assert "belongs to workspace 'wsY'" in refused["detail"]
    assert ledger.recorder.max_notification_id() == position
    assert ledger.read(workspace_id("wsZ"), lambda w: w.accounts) is None
    assert client.get("/v1/workspaces/wsZ", headers=ADMIN).status_code == 404
    # A tenant's own token sees its workspace, not another's.
    own = {"Authorization": f"Bearer {mint_token(Settings(), role='admin', tenant='t8')}"}
    assert client.get("/v1/workspaces/wsY", headers=own).status_code == 404


def test_a_refused_subscription_does_not_join_its_workspace(ledger: LedgerApplication) -> None:
    refused = run(ledger, "subscription.create", "t7", key="main", plan="nope", workspace="wsX")
    assert (refused.outcome, refused.reason) == ("rejected", "unknown_plan")
    assert ledger.read(workspace_id("wsX"), lambda w: w.accounts) is None
    assert ledger.read(roster_id("t7"), lambda r: r.workspace) is None
    # So t8 is still the only account of wsX when it subscribes: its trial.
    run(ledger, "subscription.create", "t8", key="main", plan="trial", workspace="wsX")
    assert ledger.repository.get(subscription_id("t8", "main")).status == "trialing"


def test_the_cli_adds_an_account_to_a_workspace(ledger: LedgerApplication, tmp_path: Path) -> None:
    data = tmp_path / "cli-var"
    env = {**os.environ, "BILLING_DATA_DIR": str(data), "KAFKA_BOOTSTRAP_SERVERS": "", "DATABASE_URL": ""}
    sent = CliRunner().invoke(cli, ["workspace", "add-account", "--workspace", "wsX", "--tenant", "t7"], env=env)
    assert sent.exit_code == 0, sent.output
    with sqlite3.connect(data / "bus.sqlite") as bus:  # as the ledger's consumer reads billing.ledger.commands
        [(value,)] = bus.execute("SELECT value FROM messages WHERE topic = ?", (topics.LEDGER_COMMANDS,)).fetchall()
    [result] = ledger.apply_commands([LedgerCommand.model_validate_json(value)])
    assert result.outcome == "applied", result
    assert ledger.read(workspace_id("wsX"), lambda w: list(w.accounts)) == ["t7"]
    run(ledger, "subscription.create", "t8", key="main", plan="trial", workspace="wsX")
    assert ledger.repository.get(subscription_id("t8", "main")).status == "active"
