"""``billing audit``: verify an account against its hash chain and the projections, export it, replay an export.

* ``verify --tenant T`` reads the account's events from the ledger's event store (``DATABASE_URL``'s
  ledger schema, or ``var/ledger-events.sqlite``), recomputes every hash of the chain and every balance
  (from the postings, and again with the domain model), then compares with the projections service's
  balance API over HTTP (``GET /v1/accounts/{tenant}/balance``: the projections' public read model, not
  their tables, whose layout is theirs to change), and checks the tenant's invoices and credit notes against the
  account's postings (``billing_ledger.audit_invoices``). Exit status 1 on any mismatch.
* ``export --tenant T [--out FILE]`` writes the account's stream and the tenant's invoices and credit notes as JSON
  lines (see ``billing_ledger.audit``).
* ``replay FILE [--anchor VERSION:HASH]`` is what an auditor runs on an export: chain, balances and documents from
  the file alone (no database, no service, no settings); an anchor (``events`` and ``chain_head`` of an earlier
  audit, kept where the operator's database writers cannot change it) must be found again. Exit status 1 on any
  problem, 2 on a file that cannot be read.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from billing_runtime.auth import mint_token
from billing_runtime.settings import Settings

if TYPE_CHECKING:
    from billing_ledger.application import LedgerApplication

app = typer.Typer(help="Tamper evidence: verify, export and replay an account's ledger stream and its invoices.",
                  no_args_is_help=True)

PROJECTION_TIMEOUT_SECONDS = 10.0


def _ledger(settings: Settings) -> LedgerApplication:
    # Imported here so that `billing --help` does not load the event store's libraries.
    from billing_ledger.application import LedgerApplication, persistence_env

    return LedgerApplication(persistence_env(settings.database_url, str(settings.data_dir), settings.schema("ledger")))


def _projections_url(settings: Settings) -> str:
    port = settings.service_ports["projections"] if settings.database_url else settings.embedded_port
    return f"http://127.0.0.1:{port}"


def _projection(url: str, tenant: str, settings: Settings) -> dict[str, Any]:
    token = mint_token(settings, role="viewer", tenant=tenant, subject="billing-audit")
    response = httpx.get(f"{url.rstrip('/')}/v1/accounts/{tenant}/balance", timeout=PROJECTION_TIMEOUT_SECONDS,
                         headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


@app.command()
def verify(
    tenant: Annotated[str, typer.Option(help="The tenant whose account to verify")],
    projections_url: Annotated[str | None, typer.Option(help="Projections service (default: local port)")] = None,
    skip_projection: Annotated[bool, typer.Option("--skip-projection", help="Only the event store")] = False,
    wait_seconds: Annotated[float, typer.Option(help="Let a lagging projection catch up this long")] = 0.0,
) -> None:
    """Replays the account from the event store, checks its hash chain and balances, compares the projection."""
    from billing_ledger.audit import compare_with_projection, verify_store

    settings = Settings.from_env()
    ledger = _ledger(settings)
    try:
        verification = verify_store(ledger, tenant)
    finally:
        ledger.close()
    report = verification.to_json()
    problems = list(verification.problems)
    if not skip_projection and verification.replay.events:
        url = projections_url or _projections_url(settings)
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                mismatches = compare_with_projection(verification, _projection(url, tenant, settings))
            except httpx.HTTPError as exc:
                mismatches = [f"projection unavailable at {url}: {exc}"]
            if not mismatches or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        report["projection"] = {"url": url, "problems": mismatches}
        problems += mismatches
    report["ok"] = not problems
    report["problems"] = problems
    typer.echo(json.dumps(report, indent=2))
    if problems:
        raise typer.Exit(1)


@app.command()
def export(
    tenant: Annotated[str, typer.Option(help="The tenant whose account to export")],
    out: Annotated[Path | None, typer.Option(help="JSON lines file (default: standard output)")] = None,
) -> None:
    """Writes the account's event stream as JSON lines, one event per line, in version order, then the events of
    the tenant's invoices and credit notes, one document after the other."""
    from billing_ledger.audit import export_lines

    settings = Settings.from_env()
    ledger = _ledger(settings)
    try:
        lines = 0
        with out.open("w") if out else contextlib.nullcontext(sys.stdout) as sink:
            for line in export_lines(ledger, tenant):
                sink.write(line + "\n")
                lines += 1
    finally:
        ledger.close()
    if out:
        typer.echo(json.dumps({"tenant": tenant, "events": lines, "file": str(out)}))


@app.command()
def replay(
    file: Annotated[Path, typer.Argument(help="A file written by `billing audit export`")],
    anchor: Annotated[list[str] | None, typer.Option(
        help="VERSION:HASH, the `events` and `chain_head` of an earlier audit of this account: the export must hold "
             "that event with that hash (repeat for several)")] = None,
) -> None:
    """Replays an export offline: recomputes the hash chain, the balances and the invoices and credit notes (their
    lines, totals and tax, against the account's postings) from the file alone."""
    from billing_ledger.audit import parse_anchor, replay_lines

    try:
        anchors = dict(parse_anchor(text) for text in anchor or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--anchor") from None
    try:
        with file.open() as lines:
            result = replay_lines(lines, anchors)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        typer.echo(f"error: {file} is not an export of `billing audit export`: {exc!r}", err=True)
        raise typer.Exit(2) from None
    report = result.report()
    typer.echo(json.dumps(report, indent=2))
    if report["problems"]:
        raise typer.Exit(1)
