"""``billing reports revenue`` gives the revenue report's figures exactly as ``GET /v1/reports/revenue`` does (JSON field
for field, CSV byte for byte, the table the same amounts), read from the projections' store of ``billing run``
(``projections.sqlite`` under ``BILLING_DATA_DIR``); bad options are refused as the route refuses its parameters, and a
missing store is an error that creates nothing. Fed the ledger's real events (its own aggregate and commands)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from billing_cli.main import app as cli
from billing_projections.service import ProjectionService
from billing_projections.views import REVENUE_ROWS
from click.testing import Result
from typer.testing import CliRunner

from tests.unit.projections.conftest import apply
from tests.unit.projections.ledger_events import Ledger, month_end_later, month_end_scenario
from tests.unit.projections.test_api import api_client, auth


async def billing(data_dir: Path, *args: str) -> Result:
    """``billing ARGS`` on the embedded store under ``data_dir`` (no DATABASE_URL), in a thread as a person runs it."""
    env = {"BILLING_DATA_DIR": str(data_dir), "DATABASE_URL": "", "BILLING_NAMESPACE": ""}
    return await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env)


async def http(client: httpx.AsyncClient, **params: str) -> httpx.Response:
    r = await client.get("/v1/reports/revenue", params=params, headers=auth("finance"))
    assert r.status_code == 200, r.text
    return r


@pytest.fixture
async def closed(service: ProjectionService) -> ProjectionService:
    """Two tenants' October 2026 and their November, projected into ``projections.sqlite``."""
    ledger = Ledger()
    month_end_scenario(ledger, "close")
    month_end_scenario(ledger, "other", catalog=False)
    month_end_later(ledger)
    month_end_later(ledger, "other")
    await apply(service, ledger.records())
    return service


@pytest.mark.parametrize("params", [
    {"period": "2026-10"}, {"period": "2026-10", "by": "tenant"}, {"at": "2026-10-15"}, {"period": "2026-11"},
    {"period": "2026-10", "tenant": "other"}, {"period": "2026-09"},
], ids=["october", "by-tenant", "as-at", "november", "one-tenant", "empty"])
async def test_the_command_reports_the_figures_the_http_report_gives(closed: ProjectionService, tmp_path: Path,
                                                                    params: dict[str, str]) -> None:
    options = [part for name, value in params.items() for part in (f"--{name}", value)]
    async with api_client(closed.db) as client:
        document = (await http(client, **params)).json()
        exported = (await http(client, **params, format="csv")).text
    as_json = await billing(tmp_path, "reports", "revenue", *options, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == document
    as_csv = await billing(tmp_path, "reports", "revenue", *options, "--format", "csv")
    assert as_csv.exit_code == 0, as_csv.output
    assert as_csv.stdout_bytes.decode() == exported  # RFC 4180 line ends too (``output`` makes them \n)
    as_table = await billing(tmp_path, "reports", "revenue", *options)
    assert as_table.exit_code == 0, as_table.output
    assert _amounts(as_table.output) == [[item[key] for key, _, _ in REVENUE_ROWS] for item in document["items"]]


async def test_the_table_shows_octobers_close_line_by_line(closed: ProjectionService, tmp_path: Path) -> None:
    shown = await billing(tmp_path, "reports", "revenue", "--period", "2026-10", "--by", "tenant")
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[0] == "Revenue 2026-10 (2026-10-01 to 2026-10-31, UTC; complete)"
    blocks = _blocks(shown.output)
    assert [heading for heading, _ in blocks] == ["close  USD (currency)", "other  USD (currency)"]
    for _, rows in blocks:
        # Each tenant's October: the fee's 31 days (Oct 31's share recognised by the run of Nov 1), 100.00 of credit
        # left, the dashboard's labels and signs (+ into deferred revenue, − out of it).
        assert rows["− Recognised subscription fees"] == "31.00"
        assert (rows["Deferred revenue at the end"], rows["Recognised revenue of the period"]) == ("100.00", "35.00")
        assert list(rows) == [f"{sign} {label}".strip() for _, label, sign in REVENUE_ROWS]
    as_at = await billing(tmp_path, "reports", "revenue", "--at", "2026-10-15")
    assert as_at.output.splitlines()[0] == "Revenue 2026-10 as at 2026-10-15 (2026-10-01 to 2026-10-15, UTC; complete)"
    empty = await billing(tmp_path, "reports", "revenue", "--period", "2026-09")
    assert empty.output.splitlines()[1:] == ["No deferred or recognised revenue in this period."]


@pytest.mark.parametrize(("options", "named"), [
    (["--period", "2026-13"], "--period"), (["--period", "9999-12"], "--period"), (["--at", "2026-10-32"], "--at"),
    (["--at", "9999-12-31"], "--at"), (["--period", "2026-10", "--at", "2026-10-31"], "--at"),
    (["--by", "unit"], "--by"), (["--format", "xml"], "--format"),
])
async def test_a_bad_option_is_refused_naming_it(closed: ProjectionService, tmp_path: Path, options: list[str],
                                                 named: str) -> None:
    refused = await billing(tmp_path, "reports", "revenue", *options)
    assert refused.exit_code == 2, refused.output
    assert named in refused.output


async def test_without_a_projections_store_it_says_so_and_creates_none(tmp_path: Path) -> None:
    missing = await billing(tmp_path / "var", "reports", "revenue", "--period", "2026-10")
    assert missing.exit_code == 2
    assert "no projections.sqlite in" in missing.output and "billing run" in missing.output
    assert not (tmp_path / "var").exists()


async def test_a_store_of_another_schema_version_is_refused_not_read(closed: ProjectionService, tmp_path: Path) -> None:
    await closed.db.execute("UPDATE projection_meta SET value = '18' WHERE name = 'schema_version'")
    refused = await billing(tmp_path, "reports", "revenue", "--period", "2026-10")
    assert refused.exit_code == 2
    assert "of schema 18, this billing reads" in refused.output and "billing projections rebuild" in refused.output


def _blocks(table: str) -> list[tuple[str, dict[str, str]]]:
    """The table's blocks: each heading (tenant and unit) with its figures, label (with its sign) -> amount."""
    blocks: list[tuple[str, dict[str, str]]] = []
    for line in table.splitlines()[1:]:
        if line.startswith("  ") and blocks:
            label, amount = line.strip().rsplit(maxsplit=1)
            blocks[-1][1][label.strip()] = amount
        elif line and not line.startswith(" ") and not line.startswith("No "):
            blocks.append((line, {}))
    return blocks


def _amounts(table: str) -> list[list[str]]:
    """The amounts of each block of the table, in order."""
    return [list(rows.values()) for _, rows in _blocks(table)]
