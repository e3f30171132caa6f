"""What ships beside the code: the example catalogues, the CLI's options, and invoice PDFs of any description."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from billing_cli.catalog import CatalogFileError, commands_for, keyed, load_document
from billing_cli.main import app
from billing_events import ids
from billing_ledger.application import LedgerApplication, persistence_env
from billing_ledger.catalog_commands import CatalogueNotYetPublished
from billing_ledger.domain.invoice import INVOICE, Invoice, line
from billing_ledger.invoice_pdf import render_pdf
from pypdf import PdfReader
from typer.testing import CliRunner

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["catalog.yaml", "demo-catalog.yaml"])
def test_the_example_catalogues_are_accepted_by_the_ledger(name: str, tmp_path: Path) -> None:
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        results = ledger.apply_commands(commands_for(load_document(EXAMPLES / name), "user:test"))
    finally:
        ledger.close()
    assert results and [r for r in results if r.outcome != "applied"] == []


def test_an_accounts_credit_grants_apply_even_before_the_catalogue_partitions_publish(tmp_path: Path) -> None:
    """The ledger refuses a grant in a credit unit no published catalogue declares (``unknown_unit``), and applies
    commands of different keys in any order: examples/catalog.yaml's 5000 CREDIT welcome grant, read before the
    catalogue's partition, waits for the file's catalogue (it names it, ``catalog_digest``; its batch fails and is
    handed again) and is granted once that is published. The catalogue is sent once, under its own key."""
    messages = keyed(commands_for(load_document(EXAMPLES / "catalog.yaml"), "user:test"))
    acme = str(ids.account_id("acme"))
    assert [c.kind for key, c in messages if key != acme] == ["catalog.publish"]
    ledger = LedgerApplication(persistence_env(None, str(tmp_path)))
    try:
        with pytest.raises(CatalogueNotYetPublished):  # the account's partition first: not applied, handed again
            ledger.apply_commands([c for key, c in messages if key == acme])
        assert ledger.read(ids.account_id("acme"), lambda a: a.tenant) is None
        catalogue = ledger.apply_commands([c for key, c in messages if key != acme])
        again = ledger.apply_commands([c for key, c in messages if key == acme])
        units = ledger.read(ids.account_id("acme"), lambda a: {u: a.available(u) for u in a.units()})
    finally:
        ledger.close()
    assert [r.outcome for r in catalogue + again] == ["applied"] * (1 + len(again))
    assert units == {"CREDIT": 5000 * 10**9, "USD": 100 * 10**9}


def test_a_catalogue_file_granting_a_unit_its_catalogue_does_not_declare_is_refused_before_sending() -> None:
    document = load_document(EXAMPLES / "catalog.yaml")
    document["accounts"][0]["grants"].append({"key": "odd", "unit": "TOKENS", "amount": "5"})
    with pytest.raises(CatalogFileError, match=r"accounts\[0\]\.grants\[2\]\.unit: 'TOKENS' is neither the "
                                               r"account's currency \(USD\) nor a credit unit of the catalogue "
                                               r"\(CREDIT\)"):
        commands_for(document, "user:test")


@pytest.mark.parametrize(("text", "message"), [
    ("accounts: 5", "accounts: expected a list, not 5 (int)"),
    ("accounts: [acme]", "accounts[0]: expected a mapping"),
    ("accounts:\n  - currency: USD", "accounts[0].tenant: missing: expected a tenant id"),
    ("accounts:\n  - {tenant: 42, currency: USD}", "accounts[0].tenant: 42 (int): expected a tenant id"),
    ("accounts:\n  - {tenant: 'bad tenant!', currency: USD}", "accounts[0].tenant: 'bad tenant!' (str)"),
    ("accounts:\n  - {tenant: acme, currency: USD, grants: 5}", "accounts[0].grants: expected a list, not 5 (int)"),
    ("accounts:\n  - {tenant: acme, currency: USD, grants: [x]}", "accounts[0].grants[0]: expected a mapping"),
    ("accounts:\n  - tenant: bbb\n    currency: USD\n    grants:\n      - {unit: USD, amount: '5.00'}",
     "accounts[0].grants[0].key: missing: expected a non-empty string"),
    ("accounts:\n  - {tenant: acme, currency: USD, grants: [{key: k, amount: '5.00'}]}",
     "accounts[0].grants[0].unit: missing: expected a non-empty string"),
    ("accounts:\n  - {tenant: acme, currency: USD, grants: [{key: k, unit: USD, amount: '١٢'}]}",
     "accounts[0].grants[0]: amount is not a decimal number"),
])
def test_a_malformed_catalogue_file_is_an_error_naming_the_entry_and_field_not_a_traceback(
        text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "catalogue.yaml"
    path.write_text(text + "\n")
    result = CliRunner().invoke(app, ["catalog", "apply", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert f"error: {message}" in result.output


def test_the_cli_refuses_an_unknown_collection_before_sending_anything() -> None:
    result = CliRunner().invoke(app, ["subscription", "create", "--tenant", "acme", "--key", "m", "--plan", "team",
                                      "--collection", "bogus"])
    assert result.exit_code == 2 and "charge_before_access" in result.output


def test_the_cli_refuses_a_malformed_command_id_and_explains_every_subscription_command() -> None:
    result = CliRunner().invoke(app, ["subscription", "cancel", "--tenant", "acme", "--key", "m", "--id", "retry-1"])
    assert result.exit_code == 2 and "is not a UUID" in result.output  # a ValueError traceback before
    listing = CliRunner().invoke(app, ["subscription", "--help"], terminal_width=200)
    for command in ("pause", "resume"):
        [row] = [r for r in listing.output.splitlines() if f" {command} " in r]
        assert len(row.strip(" │").split()) > 1, row  # a description beside the name (none before)


def test_an_invoice_pdf_prints_descriptions_as_written() -> None:
    invoice = Invoice(tenant="acme", key="k", document_type=INVOICE, currency="USD",
                      lines=[line("usage", "R&D calls <gpt-4> & more", Decimal("1.50"), "USD")], period_start=None,
                      period_end=None, subscription_id=None, related_invoice=None,
                      at=datetime(2026, 11, 1, tzinfo=UTC), by="user:test")
    text = "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(render_pdf(invoice, issuer="b"))).pages)
    assert "R&D calls <gpt-4> & more" in text
