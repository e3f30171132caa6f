"""Session 14 review: invoice numbers and issue dates of documents a backdated command issues, on the real ledger
(SQLite event store). Found by running the month end of a tenant mix on the real stack (session 14): a document is
dated when it is issued, its service period may start earlier."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

from billing_events.messages import LedgerCommand
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.subscription_commands import INVOICE_DUE_DAYS

from tests.unit.subscriptions.test_cancel_after_period_end import CATALOG, INVOICE_DRAFTED


def issue(ledger: LedgerApplication, kind: str, issued_at: datetime, tenant: str | None = "acme",
          **payload: Any) -> None:
    command = LedgerCommand(command_id=uuid4(), kind=kind, tenant=tenant, issued_at=issued_at, issued_by="user:test",
                            payload=payload)
    [result] = ledger.apply_commands([command])
    assert result.outcome == "applied", result


def test_invoice_numbers_follow_their_issue_dates_when_a_command_is_backdated(tmp_path: Path) -> None:
    """On Nov 22 a subscription starts at once (INV-...-000001, issued Nov 22), then a second one is created with
    ``at`` Nov 12 (backdated within the 35 days allowed): it was numbered INV-...-000002 and issued Nov 12, before its
    predecessor's date, as the review's tenant D's INV-2026-000012 (Nov 1) came after INV-2026-000011 (Nov 22). A
    sequential invoice series (EU VAT Directive art. 226(2); chronological in several member states) must not run
    backwards in time: the document is issued when it is issued, its service period may start earlier."""
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    ledger = LedgerApplication(persistence_env(None, str(tmp_path / "ledger")))
    try:
        issue(ledger, "catalog.publish", now, tenant=None, document=CATALOG, digest="c1")
        issue(ledger, "account.open", now, currency="USD")
        issue(ledger, "subscription.create", now, key="first", plan="team", at=now.isoformat())
        issue(ledger, "subscription.create", now + timedelta(minutes=1), key="second", plan="team",
              at=(now - timedelta(days=10)).isoformat())
        documents, periods = [], []
        for notification in ledger.process_recorder.select_notifications(1, 10_000):
            if notification.topic == INVOICE_DRAFTED:
                invoice = ledger.repository.get(notification.originator_id)
                documents.append((invoice.number, invoice.issued_at))
                periods.append((invoice.number, invoice.period_start, invoice.due_at))
    finally:
        ledger.close()
    assert [number for number, _ in documents] == ["INV-2026-000001", "INV-2026-000002"]
    dates = [issued for _, issued in sorted(documents)]
    assert dates == sorted(dates), documents
    # The backdated one is issued when its command was, and bills its service from Nov 12; it is due 14 days
    # after it was issued, not after its backdated start.
    assert sorted(periods)[1] == ("INV-2026-000002", now - timedelta(days=10),
                                  now + timedelta(minutes=1) + timedelta(days=INVOICE_DUE_DAYS))
    assert dates[1] == now + timedelta(minutes=1)
