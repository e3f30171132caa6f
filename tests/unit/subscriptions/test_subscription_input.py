"""subscription.create / subscription.change refuse a quantity or time zone they cannot bill, changing nothing."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.domain.invoice import invoice_id
from billing_ledger.domain.subscription import subscription_id

from tests.unit.subscriptions.test_invoice_commands_input import changes_since
from tests.unit.subscriptions.test_invoice_overage import CATALOG, NOV_1, run


@pytest.fixture
def app(tmp_path: Path) -> LedgerApplication:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(ledger, "catalog.publish", None, document=CATALOG, digest="c1")
    run(ledger, "account.open", "acme", currency="USD")  # no subscription yet: no roster either
    return ledger


def first_invoice_total(app: LedgerApplication, key: str) -> Decimal:
    invoice = app.repository.get(invoice_id("acme", f"{subscription_id('acme', key)}/{NOV_1.isoformat()}"))
    return Decimal(invoice.total)


def rejected(app: LedgerApplication, kind: str, **payload: Any) -> str:
    """Applies one command as the Kafka consumer does (rejections recorded) and returns its reason."""
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant="acme", issued_at=NOV_1, issued_by="user:test",
                            payload={"at": NOV_1.isoformat(), **payload})
    [result] = app.apply_commands([command])  # an unknown time zone raised here, failing the whole batch
    assert result.outcome == "rejected", result
    assert result.reason is not None
    return result.reason


@pytest.mark.parametrize("time_zone", ["Mars/Base", "", "../etc/passwd", 5])
def test_an_unknown_time_zone_is_refused_before_anything_changes(app: LedgerApplication, time_zone: Any) -> None:
    position = app.recorder.max_notification_id() or 0
    assert rejected(app, "subscription.create", key="m", plan="team", time_zone=time_zone) == "invalid_command"
    assert changes_since(app, position) == []
    # The account can still subscribe, with a real time zone, and is billed the plan's fee.
    run(app, "subscription.create", "acme", key="m", plan="team", time_zone="Europe/Berlin")
    assert first_invoice_total(app, "m") == Decimal("30.00")


@pytest.mark.parametrize("at", ["2026-11-01T00:00:00", "yesterday", 12345])
def test_a_malformed_at_is_refused_before_anything_changes(app: LedgerApplication, at: Any) -> None:
    """The roster was made before ``at`` was read: its ``ValueError`` then failed the command (the consumer's whole
    batch) instead of rejecting it."""
    position = app.recorder.max_notification_id() or 0
    assert rejected(app, "subscription.create", key="m", plan="team", at=at) == "invalid_command"
    assert changes_since(app, position) == []
    run(app, "subscription.create", "acme", key="m", plan="team")
    assert first_invoice_total(app, "m") == Decimal("30.00")


@pytest.mark.parametrize("quantity", [2.7, True, "2.5"])
def test_a_quantity_that_is_not_a_whole_number_is_refused_not_truncated(app: LedgerApplication, quantity: Any) -> None:
    position = app.recorder.max_notification_id() or 0
    assert rejected(app, "subscription.create", key="m", plan="team", quantity=quantity) == "invalid_command"
    assert changes_since(app, position) == []
    # A whole number (a JSON integer, as documented) is billed as such.
    run(app, "subscription.create", "acme", key="m", plan="team", quantity=2)
    assert first_invoice_total(app, "m") == Decimal("60.00")
    position = app.recorder.max_notification_id() or 0
    assert rejected(app, "subscription.change", key="m", quantity=quantity) == "invalid_command"
    assert changes_since(app, position) == []
    assert app.repository.get(subscription_id("acme", "m")).quantity == 2


@pytest.mark.parametrize("profile", [{"country": "XX"}, {"country": "US", "subdivision": "ZZ"},
                                     {"country": "DE", "subdivision": "CA"}])
def test_a_tax_profile_of_no_real_country_or_region_is_refused(app: LedgerApplication, profile: dict[str, Any]) -> None:
    position = app.recorder.max_notification_id() or 0
    assert rejected(app, "tax_profile.set", **profile) == "invalid_tax_profile"
    assert changes_since(app, position) == []
    # Real ones are kept, the subdivision as its ISO 3166-2 code (the catalogue's tax regions: US-CA).
    assert run(app, "tax_profile.set", "acme", country="us", subdivision="ca").value["subdivision"] == "CA"
