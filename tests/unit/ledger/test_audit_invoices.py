"""The audit's invoice checks (``billing audit verify``): a tenant's invoices and credit notes against its books.

A clean account passes; a store whose documents and postings disagree (an event changed or written directly, past
the commands) is reported with the document's number and id, what it says and what the books say, exit status 1.
The hash chain cannot find these: documents are not chained, and an event written through the domain model chains.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
from billing_cli.audit import app as audit_cli
from billing_events import ids
from billing_events.money import SUBUNITS_PER_UNIT
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.audit import export_lines, replay_lines, verify_store
from billing_ledger.domain.invoice import Invoice, invoice_id
from billing_ledger.domain.subscription import subscription_id
from billing_ledger.payment_commands import refund_credit_note_key
from typer.testing import CliRunner

from tests.unit.subscriptions.test_invoice_books import CATALOG, first_invoice, gateway_refund
from tests.unit.subscriptions.test_invoice_overage import DEC_1, NOV_1, debit, renew_and_bill, run, usage_line

CENT = SUBUNITS_PER_UNIT // 100
DEC_2, DEC_16, DEC_20 = (datetime(2026, 12, day, tzinfo=UTC) for day in (2, 16, 20))


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerApplication]:
    """November's invoice paid and partly refunded at the gateway (a credit note), December's billing November's
    overage, open, and then partly credited by an immediate cancel (a credit note, account credit), and usage beyond
    that credit, no invoice billing it yet."""
    app = LedgerApplication(persistence_env(None, str(tmp_path)))
    run(app, "catalog.publish", None, document=CATALOG, digest="books-1")
    run(app, "account.open", "acme", currency="USD")
    run(app, "tax_profile.set", "acme", country="DE")
    run(app, "subscription.create", "acme", key="m", plan="team")  # 30.00 + 5.70 VAT
    run(app, "invoice.mark_paid", "acme", at=datetime(2026, 11, 2, tzinfo=UTC), invoice_id=str(first_invoice(app).id),
        payment="pi_1")
    debit(app, "2.00", NOV_1, datetime(2026, 11, 20, tzinfo=UTC))
    renew_and_bill(app, NOV_1, DEC_1, [usage_line("2.00")])  # 30.00 + 2.00 + 6.08 VAT
    gateway_refund(app, first_invoice(app), "11.90", DEC_2)  # 10.00 + 1.90 VAT back
    run(app, "subscription.cancel", "acme", at=DEC_16, key="m", immediately=True)  # 16 of 31 days: 15.48 + 2.94 of credit
    debit(app, "20.00", DEC_1, DEC_20)  # 18.42 of that credit, 1.58 beyond it
    yield app
    app.close()


def december(app: LedgerApplication) -> Invoice:
    return app.repository.get(invoice_id("acme", f"{subscription_id('acme', 'm')}/{DEC_1.isoformat()}"))


def refund_note(app: LedgerApplication) -> Invoice:
    return app.repository.get(invoice_id("acme", refund_credit_note_key(first_invoice(app), "stripe", "re_11.90")))


def rewrite(tmp_path: Path, document: Invoice, version: int, old: bytes, new: bytes) -> None:
    """Changes a stored event of ``document`` in place, as someone with write access to the database could."""
    with sqlite3.connect(tmp_path / "ledger-events.sqlite") as db:
        [state] = db.execute("SELECT state FROM stored_events WHERE originator_id = ? AND originator_version = ?",
                             (document.id.hex, version)).fetchone()
        assert state.count(old) == 1, state
        db.execute("UPDATE stored_events SET state = ? WHERE originator_id = ? AND originator_version = ?",
                   (state.replace(old, new), document.id.hex, version))


def verify_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict[str, object]]:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("BILLING_DATA_DIR", str(tmp_path))
    verified = CliRunner().invoke(audit_cli, ["verify", "--tenant", "acme", "--skip-projection"])
    return verified.exit_code, json.loads(verified.output)


def test_a_clean_accounts_invoices_and_credit_notes_agree_with_its_books_and_its_export_replays(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = verify_store(ledger, "acme")
    assert report.problems == []
    # November's and December's invoices, the refund's and the cancel's credit notes.
    assert report.documents == 4
    account = ledger.repository.get(ids.account_id("acme"))
    # What is owed: December's invoice and the usage beyond the cancel's credit, no invoice billing it yet.
    assert account.receivable("USD") == (3808 + 158) * CENT
    exit_code, shown = verify_cli(tmp_path, monkeypatch)
    assert (exit_code, shown["ok"], shown["documents_checked"]) == (0, True, 4)
    replayed = replay_lines(list(export_lines(ledger, "acme")))
    assert replayed.problems == [] and replayed.wallets()["USD"]["receivable"] == (3808 + 158) * CENT


def test_an_invoice_that_no_longer_bills_what_it_made_receivable_is_reported(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoice = december(ledger)
    rewrite(tmp_path, invoice, 1, b'"amount":"30.00"', b'"amount":"31.00"')  # its base fee line, as drafted
    name = f"invoice INV-2026-000002 ({invoice.id})"
    exit_code, shown = verify_cli(tmp_path, monkeypatch)
    assert exit_code == 1 and shown["chain_ok"] is True  # documents are not chained
    assert shown["problems"] == [
        # Its own arithmetic (since session 14): the line is not what it was rounded from, the lines add up to more
        # than it was finalized for, and its tax is not 19 % of what it now bills.
        f"{name} line 1 (base_fee) bills 31.00 USD: not its exact amount 30.00 rounded once",
        f"{name} was finalized for 38.08 USD, but its lines add up to 39.08",
        f"{name} charges 6.08 USD of tax at 19 % of 33.00, which is 6.27",
        f"{name} bills 39.08 USD (net 33.00, tax 6.08), but made receivable 38.08 USD (net 32.00, tax 6.08)",
        (f"USD receivables are 39.66 in the postings, but the open invoices ({name} 39.08) and the overage no invoice "
        "bills yet (1.58) come to 40.66: -1.00 unexplained")]


def test_an_invoice_marked_paid_that_its_payment_never_cleared_is_reported(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoice = december(ledger)
    invoice.mark_paid(at=DEC_20, payment="pi_forged", by="user:mallory")  # the document alone, no command
    ledger.save(invoice)
    name = f"invoice INV-2026-000002 ({invoice.id})"
    exit_code, shown = verify_cli(tmp_path, monkeypatch)
    assert exit_code == 1
    assert shown["problems"] == [
        f"{name} is paid, but its payment cleared 0.00 USD of the 38.08 USD it made receivable",
        ("USD receivables are 39.66 in the postings, but the open invoices (none) and the overage no invoice bills "
        "yet (1.58) come to 1.58: 38.08 unexplained")]


def test_a_credit_note_that_gives_back_more_than_its_invoice_charged_is_reported(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    note = refund_note(ledger)
    rewrite(tmp_path, note, 1, b'"amount":"-10.00"', b'"amount":"-40.00"')
    exit_code, shown = verify_cli(tmp_path, monkeypatch)
    assert exit_code == 1
    assert shown["problems"] == [
        (f"credit note CN-2026-000001 ({note.id}) line 1 (adjustment) bills -40.00 USD: not its exact amount -10.00 "
        "rounded once"),
        f"credit note CN-2026-000001 ({note.id}) was finalized for -11.90 USD, but its lines add up to -41.90",
        (f"credit note CN-2026-000001 ({note.id}) credits 41.90 USD (net 40.00, tax 1.90), but 11.90 USD (net 10.00, "
        "tax 1.90) was refunded out of the gateway's clearing"),
        (f"invoice INV-2026-000001 ({first_invoice(ledger).id}) charged 35.70 USD, but the documents correcting it "
         f"give back 41.90 USD (credit note CN-2026-000001 ({note.id}) 41.90): 6.20 below zero")]


def test_receivables_settled_outside_any_invoice_are_reported(
        ledger: LedgerApplication, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    account = ledger.repository.get(ids.account_id("acme"))
    # Chained like every event the domain model makes: only the invoice checks see that no invoice explains it.
    account.settle_receivable(settlement_id=uuid4(), unit="USD", amount=100 * CENT, at=DEC_20, cause={})
    ledger.save(account)
    exit_code, shown = verify_cli(tmp_path, monkeypatch)
    assert (exit_code, shown["chain_ok"]) == (1, True)
    assert shown["problems"] == [
        (f"USD receivables are 38.66 in the postings, but the open invoices (invoice INV-2026-000002 "
        f"({december(ledger).id}) 38.08) and the overage no invoice bills yet (1.58) come to 39.66: -1.00 unexplained")]
