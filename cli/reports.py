"""``billing reports revenue``: the revenue report of a month-end close (IFRS 15) on the command line.

``--period YYYY-MM`` (a UTC month; default this month) or ``--at YYYY-MM-DD`` (its month up to the end of that day),
``--by tenant`` (a line per tenant and unit instead of per unit), ``--tenant T`` (one tenant's), ``--format table``
(readable, the dashboard's labels), ``json`` (the document ``GET /v1/reports/revenue`` answers) or ``csv`` (the file
``?format=csv`` gives). The same figures as the HTTP report: it reads them with the projections' own query
(``billing_projections.lists.revenue_document``, from ``revenue_daily`` and the chart of accounts) from the
projections' store, as ``billing reconcile`` reads the services' stores: ``DATABASE_URL``'s projections schema
(``BILLING_NAMESPACE`` included), or ``projections.sqlite`` of ``billing run`` under ``BILLING_DATA_DIR``. It writes
nothing and needs no running service and no token. Exit status 0: the report; 2: bad input (the same checks as the
HTTP report's parameters), or no projections store of this version there.

A month's figures are the postings dated in it: a month's last day of subscription fees is recorded by the ledger's
first sweep of the next month (dated in the month), so read a month once that sweep is projected
(services/projections/README.md "Revenue report").
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated, Any

import typer
from billing_runtime.settings import Settings

if TYPE_CHECKING:
    from billing_projections.lists import RevenuePeriod

app = typer.Typer(help="Finance reports from the projections' read models.", no_args_is_help=True)

FORMATS = ("table", "json", "csv")
BY = ("tenant",)
STORE_FILE = "projections.sqlite"  # the embedded default's file under BILLING_DATA_DIR


class StoreMissing(RuntimeError):
    pass


@app.callback()
def reports() -> None:
    """Finance reports of the projections service."""  # a callback keeps `revenue` a sub-command


@app.command("revenue")
def revenue(
    period: Annotated[str | None, typer.Option(help="A month, YYYY-MM, not after this month (default: this month, "
                                                    "UTC)")] = None,
    at: Annotated[str | None, typer.Option(help="Instead of --period: a day, YYYY-MM-DD, not after today; the report "
                                                "is as at its end (its month to that day)")] = None,
    by: Annotated[str | None, typer.Option(help="tenant: one line per tenant and unit")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's figures")] = None,
    output: Annotated[str, typer.Option("--format", help="table (readable) | json (the HTTP report's document) | "
                                                         "csv (the HTTP report's CSV)")] = "table",
) -> None:
    """Deferred and recognised revenue for a month or as at a day: the roll-forward of deferred revenue (opening, in,
    out, closing) and the period's recognised revenue, breakage and promotional expense, per unit (or per tenant and
    unit), exactly as GET /v1/reports/revenue reports them."""
    from billing_events.timeutil import utcnow
    from billing_projections.lists import revenue_period
    from billing_runtime.problems import Problem

    if output not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    if by not in (None, *BY):
        raise typer.BadParameter(f"--by takes only {', '.join(BY)}")
    try:
        chosen = revenue_period(period, at, utcnow())
    except Problem as exc:  # the HTTP report's own checks: its 422 names the parameter, here the option
        errors = exc.extra.get("errors") or [{}]
        option = str(errors[0].get("location", "query.period")).removeprefix("query.")
        raise typer.BadParameter(f"--{option}: {exc.detail}") from None
    try:
        document = asyncio.run(read_revenue(Settings.from_env(), tenant=tenant, period=chosen, by_tenant=by == "tenant"))
    except StoreMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(render(document, output), nl=output != "csv")


async def read_revenue(settings: Settings, *, tenant: str | None, period: RevenuePeriod, by_tenant: bool
                       ) -> dict[str, Any]:
    """The report's document from the projections' store (read only), as the HTTP route builds it."""
    from billing_projections.api_models import RevenueReport
    from billing_projections.lists import revenue_document
    from billing_projections.store import SCHEMA_VERSION
    from billing_runtime.db import open_database

    if not settings.database_url and not (settings.data_dir / STORE_FILE).exists():
        raise StoreMissing(f"no {STORE_FILE} in {settings.data_dir}/ (BILLING_DATA_DIR): has `billing run` run there? "
                           "(or set DATABASE_URL for the real stack)")
    db = await open_database("projections", settings)
    try:
        where = settings.schema("projections") if settings.database_url else str(settings.data_dir / STORE_FILE)
        try:
            stored = await db.fetchval("SELECT value FROM projection_meta WHERE name = 'schema_version'")
        except Exception as exc:  # noqa: BLE001 - asyncpg's or sqlite3's "no such table": projections never ran here
            raise StoreMissing(f"the projections' tables are not in {where}: have the projections run there? "
                               f"({exc})") from None
        if stored != SCHEMA_VERSION:
            # Another version's tables (the service rebuilds them when it starts): their rows may not mean ours.
            raise StoreMissing(f"the projections in {where} are of schema {stored}, this billing reads "
                               f"{SCHEMA_VERSION}: start `billing serve projections` of this version (it rebuilds "
                               "them) or run `billing projections rebuild`")
        document = await revenue_document(db, tenant=tenant, period=period, by_tenant=by_tenant)
    finally:
        await db.close()
    # Through the HTTP route's response model, so the JSON is the route's, field for field.
    return RevenueReport.model_validate(document).model_dump(mode="json")


def render(document: dict[str, Any], output: str) -> str:
    """The report as ``output``: ``json`` (the HTTP document), ``csv`` (the HTTP CSV), ``table`` (readable)."""
    if output == "json":
        return json.dumps(document, indent=2)
    if output == "csv":
        from billing_projections.api_reports import REVENUE_COLUMNS
        from billing_projections.exports import csv_text

        return csv_text(REVENUE_COLUMNS, document["items"])
    return table(document)


def table(document: dict[str, Any]) -> str:
    """Each line a block: the dashboard's figures in its order (roll-forward, then the period's revenue), amounts
    right-aligned; ``+`` a flow into deferred revenue, ``−`` one out of it."""
    from billing_projections.views import REVENUE_ROWS

    last_day = document["as_at"] or _day_before(document["end"])
    state = "complete" if document["complete"] else "to date"
    title = f"Revenue {document['period']}" + (f" as at {document['as_at']}" if document["as_at"] else "")
    out = [f"{title} ({document['start']} to {last_day}, UTC; {state})"]
    if not document["items"]:
        out.append("No deferred or recognised revenue in this period.")
        return "\n".join(out)
    label_width = max(len(label) for _, label, _ in REVENUE_ROWS)
    for item in document["items"]:
        width = max(len(str(item[key])) for key, _, _ in REVENUE_ROWS)
        owner = f"{item['tenant']}  " if item.get("tenant") else ""
        out += ["", f"{owner}{item['unit']} ({item['kind']})"]
        out += [f"  {sign or ' '} {label:<{label_width}}  {item[key]:>{width}}" for key, label, sign in REVENUE_ROWS]
    return "\n".join(out)


def _day_before(day: str) -> str:
    from datetime import date, timedelta

    return (date.fromisoformat(day) - timedelta(days=1)).isoformat()
