"""``billing audit export`` carries the tenant's invoices and credit notes after its account's chained stream, and
``billing audit replay`` checks them from the file alone: their lines, totals and tax, and what each made receivable,
was paid or gave back against the account's postings, which the chain protects. Before session 14 an export was the
account's stream only, and invoices, credit notes and tax could not be checked offline. An anchor (an earlier
audit's ``events`` and ``chain_head``) proves the stream was not rewritten since."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from billing_cli.audit import app as audit_cli
from billing_ledger.application import LedgerApplication
from billing_ledger.audit import export_lines
from typer.testing import CliRunner

from tests.unit.ledger.test_audit_invoices import december, first_invoice, ledger, refund_note
from tests.unit.payments.support import TENANT, run
from tests.unit.payments.test_refund_before_payment import deliver, fresh, notification
from tests.unit.payments.test_top_up_grants import pay, place

__all__ = ["ledger"]
ROOT = Path(__file__).resolve().parents[3]


def export(app: LedgerApplication, tenant: str, path: Path) -> list[dict[str, Any]]:
    path.write_text("".join(line + "\n" for line in export_lines(app, tenant)))
    return [json.loads(line) for line in path.read_text().splitlines()]


def replay_cli(path: Path, *args: str) -> tuple[int, dict[str, Any]]:
    replayed = CliRunner().invoke(audit_cli, ["replay", str(path), *args])
    return replayed.exit_code, json.loads(replayed.output) if replayed.output.startswith("{") else {}


def rewrite(path: Path, document: str, version: int, old: str, new: str) -> None:
    """Changes one document event of the export file (not the store): what someone handing the file over could do."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    [record] = [r for r in records if r["aggregate_id"] == document and r["version"] == version]
    text = json.dumps(record["data"], sort_keys=True)
    assert text.count(old) == 1, text
    record["data"] = json.loads(text.replace(old, new))
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def test_the_export_carries_the_tenants_documents_and_replays_them_offline_with_its_chain(
        ledger: LedgerApplication, tmp_path: Path) -> None:
    path = tmp_path / "acme.jsonl"
    records = export(ledger, "acme", path)
    account = [r for r in records if r["type"].startswith("BillingAccount.")]
    documents = {r["aggregate_id"] for r in records if r["type"].startswith("Invoice.")}
    # The account's chained stream first, then November's and December's invoices and the two credit notes.
    assert records[:len(account)] == account and len(documents) == 4
    assert {str(first_invoice(ledger).id), str(december(ledger).id), str(refund_note(ledger).id)} <= documents
    code, report = replay_cli(path, "--anchor", f"{len(account)}:{account[-1]['chain_hash']}")
    assert (code, report["problems"], report["chain_ok"]) == (0, [], True), report
    assert (report["tenant"], report["documents_checked"], report["events"]) == ("acme", 4, len(account))
    assert report["chain_head"] == account[-1]["chain_hash"]


def test_an_invoices_line_or_tax_changed_in_the_export_is_found_by_the_replay(
        ledger: LedgerApplication, tmp_path: Path) -> None:
    path = tmp_path / "acme.jsonl"
    export(ledger, "acme", path)
    invoice = december(ledger)
    name = f"invoice INV-2026-000002 ({invoice.id})"
    rewrite(path, str(invoice.id), 1, '"amount": "30.00"', '"amount": "20.00"')  # its base fee, as drafted
    code, report = replay_cli(path)
    assert (code, report["chain_ok"]) == (1, True)  # documents are not chained: their checks find it
    assert report["problems"] == [
        f"{name} line 1 (base_fee) bills 20.00 USD: not its exact amount 30.00 rounded once",
        f"{name} was finalized for 38.08 USD, but its lines add up to 28.08",
        f"{name} charges 6.08 USD of tax at 19 % of 22.00, which is 4.18",
        f"{name} bills 28.08 USD (net 22.00, tax 6.08), but made receivable 38.08 USD (net 32.00, tax 6.08)"]

    export(ledger, "acme", path)
    [tax] = [item for item in invoice.lines if item["kind"] == "tax"]
    assert tax["amount"] == "6.08"
    finalized = next(r for r in map(json.loads, path.read_text().splitlines())
                     if r["aggregate_id"] == str(invoice.id) and r["type"] == "Invoice.Finalized")
    tax_version = max(r["version"] for r in map(json.loads, path.read_text().splitlines())
                      if r["aggregate_id"] == str(invoice.id) and r["type"] == "Invoice.LinesAdded"
                      and '"6.08"' in json.dumps(r["data"]))
    assert tax_version < finalized["version"]
    rewrite(path, str(invoice.id), tax_version, '"amount": "6.08"', '"amount": "5.08"')
    code, report = replay_cli(path)
    assert code == 1 and report["problems"] == [
        f"{name} line 3 (tax) bills 5.08 USD: not its exact amount 6.08 rounded once",
        f"{name} was finalized for 38.08 USD, but its lines add up to 37.08",
        f"{name} charges 5.08 USD of tax at 19 % of 32.00, which is 6.08",
        f"{name} bills 37.08 USD (net 32.00, tax 5.08), but made receivable 38.08 USD (net 32.00, tax 6.08)"]


def test_a_document_left_out_of_the_export_and_a_stale_anchor_are_found(
        ledger: LedgerApplication, tmp_path: Path) -> None:
    path = tmp_path / "acme.jsonl"
    records = export(ledger, "acme", path)
    account = [r for r in records if r["type"].startswith("BillingAccount.")]
    note = str(refund_note(ledger).id)
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r["aggregate_id"] != note))
    code, report = replay_cli(path)
    assert (code, report["documents_checked"]) == (1, 3)
    assert report["problems"] == [(f"the account's postings name document {note}, which is not one of tenant acme's "
                                  "invoices or credit notes")]
    # The head an earlier audit kept: the stream since rewritten from that version on, or cut short before it.
    export(ledger, "acme", path)
    code, report = replay_cli(path, "--anchor", f"{len(account) - 1}:{'ab' * 32}",
                              "--anchor", f"{len(account) + 5}:{account[-1]['chain_hash']}")
    assert code == 1 and report["problems"] == [
        (f"version {len(account) - 1} ({account[-2]['type']}): chain hash {account[-2]['chain_hash']} is not the "
        f"anchor's {'ab' * 32}: the stream was rewritten since that audit"),
        (f"the anchor's version {len(account) + 5} is beyond the export's last event ({len(account)}): events were "
        "removed since that audit")]
    refused = CliRunner().invoke(audit_cli, ["replay", str(path), "--anchor", "head"])
    assert refused.exit_code == 2 and "VERSION:HASH" in refused.output
    path.write_text("not json\n")
    unreadable = CliRunner().invoke(audit_cli, ["replay", str(path)])
    assert unreadable.exit_code == 2 and "is not an export" in unreadable.output


def test_a_top_ups_invoice_and_its_refunds_credit_note_are_exported_and_checked_against_the_purchase(
        tmp_path: Path) -> None:
    app = fresh(tmp_path, "ledger")
    try:
        order = place(app, "o1", amount="100")  # 100.00 + 19.00 DE VAT
        pay(app, order)
        refunded = deliver(app, notification("refund_succeeded", order["order_id"], "119.00", "evt_refund", "re_1",
                                             f"pi-{order['key']}"))
        assert refunded.outcome == "applied", refunded
        assert run(app, "account.open", "other", currency="USD").outcome == "applied"
        path = tmp_path / "acme.jsonl"
        records = export(app, TENANT, path)
    finally:
        app.close()
    kinds = [(r["type"], r["data"].get("document_type")) for r in records if r["type"] == "Invoice.Drafted"]
    assert kinds == [("Invoice.Drafted", "invoice"), ("Invoice.Drafted", "credit_note")]
    code, report = replay_cli(path)
    assert (code, report["problems"], report["documents_checked"]) == (0, [], 2), report
    invoice = next(r["aggregate_id"] for r in records if r["type"] == "Invoice.Drafted"
                   and r["data"]["document_type"] == "invoice")
    rewrite(path, invoice, 1, '"amount": "19.00", "description": "DE VAT 19 % of 100.00"',
            '"amount": "9.00", "description": "DE VAT 19 % of 100.00"')
    code, report = replay_cli(path)
    assert code == 1
    problems = "\n".join(report["problems"])
    assert "bills 109.00 USD (tax 9.00), but its purchase recorded 119.00 paid (tax 19.00)" in problems, report
    # The tax line states its rate (session 15), so the audit checks the tax against it too.
    assert "charges 9.00 USD of tax at 19 % of 100.00, which is 19.00" in problems, report


def test_an_auditor_replays_an_export_with_this_repository_alone(ledger: LedgerApplication, tmp_path: Path) -> None:
    """No database, no Kafka, no settings, no data directory: the ``billing`` command of an installed checkout."""
    path = tmp_path / "acme.jsonl"
    export(ledger, "acme", path)
    elsewhere = tmp_path / "auditor"
    elsewhere.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(elsewhere)}
    replayed = subprocess.run([str(Path(sys.executable).parent / "billing"), "audit", "replay", str(path)],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert replayed.returncode == 0, replayed.stderr
    report = json.loads(replayed.stdout)
    assert (report["problems"], report["documents_checked"]) == ([], 4)
    assert list(elsewhere.iterdir()) == []  # it wrote nothing (no var/, no store)


def test_an_export_of_the_account_stream_alone_reports_the_documents_its_postings_name(
        ledger: LedgerApplication, tmp_path: Path) -> None:
    """An export written before session 14 (the account's lines only) replays its chain and balances as before, and
    says which documents are missing from it."""
    path = tmp_path / "acme.jsonl"
    records = [r for r in export(ledger, "acme", path) if r["type"].startswith("BillingAccount.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, report = replay_cli(path)
    assert (code, report["chain_ok"], report["documents_checked"]) == (1, True, 0)
    assert len(report["problems"]) == 4 and all("which is not one of tenant acme's" in p for p in report["problems"])
