"""Review findings (session 13), seed 004 trial eligibility: "exactly one billing account in the workspace".

Both failed before the fix (session 13): naming a workspace on ``subscription.create`` (the only workspace field the
HTTP API had) never made the account a member of it, so a second billing account of the same workspace still got a
14-day trial; and eligibility counted the workspace's accounts without the subscribing one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_subscriptions import CATALOG, open_account, run


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    return ledger


def test_a_second_account_naming_the_same_workspace_gets_no_trial(app: LedgerApplication) -> None:
    for tenant in ("corp-eu", "corp-us"):
        open_account(app, tenant)
    run(app, "subscription.create", "corp-eu", key="t", plan="trial", workspace="corp")
    assert app.repository.get(subscription_id("corp-eu", "t")).status == "trialing"
    run(app, "subscription.create", "corp-us", key="t", plan="trial", workspace="corp")
    # The workspace now has two billing accounts: the second one is billed at once.
    assert app.repository.get(subscription_id("corp-us", "t")).status == "active"


def test_an_account_outside_a_one_account_workspace_gets_no_trial_there(app: LedgerApplication) -> None:
    for tenant in ("corp-eu", "corp-us"):
        open_account(app, tenant)
    run(app, "workspace.add_account", "corp-eu", workspace="corp")
    run(app, "subscription.create", "corp-us", key="t", plan="trial", workspace="corp")
    assert app.repository.get(subscription_id("corp-us", "t")).status == "active"
