"""Review finding (session 13): ``subscription.create`` takes any ``at``, however far from now.

Over HTTP, ``{"at": "1900-01-01T00:00:00+00:00"}`` started an active subscription with invoice INV-1900-000001, and
each scheduler tick then renews one more period of 1900 (about 1,520 invoices of the fee to catch up); ``2099``
issued INV-2099-000001 at once. Such an ``at`` is now refused (``at_out_of_range``, nothing recorded): see
test_effective_time_bounds.py for the bounds.
"""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env

from tests.unit.subscriptions.test_subscriptions import CATALOG, NOV_1, open_account, run


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    return ledger


@pytest.mark.parametrize("at", ["1900-01-01T00:00:00+00:00", "2099-01-01T00:00:00+00:00"])
def test_a_subscription_starting_decades_from_the_command_is_refused(app: LedgerApplication, at: str) -> None:
    open_account(app, "acme")
    result = run(app, "subscription.create", "acme", at=NOV_1, key="main", plan="team", trial=False)
    assert result.outcome == "applied"  # the same command at the issue time is fine
    # Issued on Nov 1 (as over HTTP: issued now), taking effect decades away.
    command = LedgerCommand(command_id=uuid4(), kind="subscription.create", tenant="acme", issued_at=NOV_1,
                            issued_by="user:test", payload={"at": at, "key": "other", "plan": "team", "trial": False})
    [moved] = app.apply_commands([command])
    assert moved.outcome == "rejected"
