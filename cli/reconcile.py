"""``billing reconcile usage``: proves from the services' own stores that every accepted usage event ended in one
outcome (posted, rejected with a reason, not billable, or still in flight), and lists every discrepancy.

It reads ingest's ``seen_events``, rating's decisions and the ledger's event store (``DATABASE_URL``'s schemas,
``BILLING_NAMESPACE`` included, or the SQLite files of ``billing run`` under ``BILLING_DATA_DIR``), tenant by
tenant, and joins them with ``billing_events.reconciliation``. It writes nothing. Ingest remembers accepted events
for the dedup window only (``BILLING_DEDUP_WINDOW_DAYS``): that is the window it can prove, and ``--since`` is
raised to its start. Exit status 0: no discrepancy; 1: discrepancies; 2: bad input or a store missing.

``billing reconcile refunds --tenant T`` lists, from the ledger's store alone, the tenant's gateway refunds the ledger
did not apply: those that came before the payment they give back and were not applied with it
(``billing_ledger.reconcile.parked_refunds``) and those it rejected when they came (``rejected_refunds``).
``billing reconcile disputes --tenant T`` lists the tenant's card disputes finance has to follow
(``billing_ledger.reconcile.disputes``): open ones and the funds withdrawn for them, lost ones waiting for their
payment, dispute notifications the ledger rejected (from the tenant's own index of them; ``--scan-receipts`` also
reads every receipt, for rejections recorded before session 14), and the fees gateways charged for disputes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import typer
from billing_events.reconciliation import GRACE_SECONDS_DEFAULT, Report, account_for, check_debits
from billing_events.timeutil import parse_timestamp, utcnow
from billing_runtime.settings import Settings

if TYPE_CHECKING:
    from billing_ledger.application import LedgerApplication
    from billing_runtime.db import Database

app = typer.Typer(help="Reconciliation: prove every accepted usage event has exactly one outcome; list gateway refunds "
                       "not applied to a payment and card disputes to follow.",
                  no_args_is_help=True)

FORMATS = ("table", "json")
STORES = ("ingest.sqlite", "rating.sqlite", "ledger-events.sqlite")  # the embedded default's files


class StoreMissing(RuntimeError):
    pass


def _moment(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{name}: {exc}") from None


@app.command("usage")
def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: every tenant ingest knows)")] = None,
    since: Annotated[str | None, typer.Option(help="Events at or after this time (ISO 8601 with offset; default "
                                                   "and earliest: the start of the dedup window)")] = None,
    until: Annotated[str | None, typer.Option(help="Events before this time (ISO 8601 with offset; default: now "
                                                   "plus the allowed future skew)")] = None,
    grace_seconds: Annotated[int, typer.Option(help="How long an event may be in flight (not rated, or rated and "
                                                    "not applied by the ledger) before it is a discrepancy")]
    = GRACE_SECONDS_DEFAULT,
    output: Annotated[str, typer.Option("--format", help="table (readable) | json (one document)")] = "table",
) -> None:
    """Counts the outcomes of accepted usage events and lists every discrepancy (exit status 1 if any)."""
    if output not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    if grace_seconds < 0:
        raise typer.BadParameter("--grace-seconds must not be negative")
    settings = Settings.from_env()
    now = utcnow()
    first, last = _moment("--since", since), _moment("--until", until)
    try:
        report = asyncio.run(reconcile_usage(settings, now, tenant, first, last, timedelta(seconds=grace_seconds)))
    except StoreMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(json.dumps(report.to_json(), indent=2) if output == "json" else report.to_table())
    if not report.ok:
        raise typer.Exit(1)


def _listed(output: str, listing: Callable[[Any], Any]) -> Any:
    """``listing`` of the ledger's store (``--format`` checked first; exit status 2 if the store is missing)."""
    if output not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    try:
        ledger = _ledger(Settings.from_env())
    except StoreMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        return listing(ledger)
    finally:
        ledger.close()


@app.command("refunds")
def refunds(
    tenant: Annotated[list[str], typer.Option(help="The tenant (repeat for several)")],
    output: Annotated[str, typer.Option("--format", help="table (readable) | json (one document)")] = "table",
) -> None:
    """Lists the gateway refunds the ledger did not apply to their payment: those that came before it, still awaiting
    it or rejected when it came, and those rejected when they came (part of a paid order, more than is left of it,
    ...), each with its reason. The money has left at the gateway for each: exit status 1 if any, 0 if none, 2 if the
    ledger's store is missing."""
    from billing_ledger.reconcile import parked_refunds, rejected_refunds

    names = list(dict.fromkeys(tenant))
    found = _listed(output, lambda ledger: [refund for name in names for refund in parked_refunds(ledger, name)]
                    + rejected_refunds(ledger, names))
    if output == "json":
        typer.echo(json.dumps([{**vars(r), "at": r.at.isoformat()} for r in found], indent=2))
    else:
        typer.echo(f"{len(found)} gateway refund(s) not applied to a payment")
        for r in found:
            gives_back = f"invoice {r.invoice_id}" if r.invoice_id else f"order {r.order_id}"
            typer.echo(f"{r.tenant}  {r.key}  {r.amount} {r.currency}  {gives_back}  {r.status}"
                       + (f" ({r.reason}: {r.detail})" if r.reason else "")
                       + (f"  command {r.command_id}" if r.command_id else ""))
    if found:
        raise typer.Exit(1)


@app.command("disputes")
def disputes(
    tenant: Annotated[list[str], typer.Option(help="The tenant (repeat for several)")],
    output: Annotated[str, typer.Option("--format", help="table (readable) | json (one document)")] = "table",
    scan_receipts: Annotated[bool, typer.Option(
        "--scan-receipts", help="Also find rejected dispute notifications in every receipt of the store (those "
                                "rejected before session 14 are not indexed by tenant; the scan reads the whole "
                                "store)")] = False,
) -> None:
    """Lists the tenant's card disputes finance follows: open ones (and the funds the gateway withdrew for them, not
    settled yet), lost ones whose chargeback waits for the payment it takes back, dispute notifications the ledger
    rejected for reconciliation (reason code), and the fees gateways charged for disputes (booked as the operator's
    expense; one stated in another currency than the account's is not booked). Exit status 1 if any needs a person
    (open, waiting, rejected, or a fee not booked), 0 if none, 2 if the ledger's store is missing."""
    from billing_ledger.reconcile import disputes as disputes_of

    found = _listed(output, lambda ledger: disputes_of(ledger, tenant, scan_receipts=scan_receipts))
    if output == "json":
        typer.echo(json.dumps({
            "open": [{**vars(d), "opened_at": d.opened_at.isoformat()} for d in found.open],
            "funds_withdrawn": [d.key for d in found.withdrawn],
            "awaiting_payment": [{**vars(r), "at": r.at.isoformat()} for r in found.awaiting_payment],
            "rejected": [{**vars(r), "at": r.at.isoformat()} for r in found.rejected],
            "fees": [vars(f) for f in found.fees],
            "fees_booked": {code: str(total) for code, total in found.fees_booked().items()}}, indent=2))
    else:
        withdrawn = found.withdrawn
        typer.echo(f"{len(found.open)} open dispute(s), {len(withdrawn)} with funds withdrawn")
        for d in found.open:
            of = f"invoice {d.invoice_id}" if d.invoice_id else f"order {d.order_id}"
            typer.echo(f"{d.tenant}  {d.key}  {d.amount} {d.currency}  {of}  withdrawn {d.withdrawn} {d.currency}  "
                       f"opened {d.opened_at.isoformat()}")
        typer.echo(f"{len(found.awaiting_payment)} lost dispute(s) waiting for their payment")
        for r in found.awaiting_payment:
            typer.echo(f"{r.tenant}  {r.key}  {r.amount} {r.currency}  order {r.order_id}  {r.status}"
                       + (f" ({r.reason}: {r.detail})" if r.reason else ""))
        typer.echo(f"{len(found.rejected)} dispute notification(s) rejected for reconciliation")
        for c in found.rejected:
            typer.echo(f"{c.tenant}  {c.kind}  {c.reason}  command {c.command_id}  {c.at.isoformat()}"
                       + (f"  {c.dispute}" if c.dispute else "") + (f"  ({c.detail})" if c.detail else ""))
        booked = ", ".join(f"{total} {code}" for code, total in found.fees_booked().items()) or "none"
        typer.echo(f"{len(found.fees)} dispute fee(s) booked: {booked}"
                   + (f"; {len(found.unbooked_fees)} in another currency, not booked" if found.unbooked_fees else ""))
        for f in found.fees:
            typer.echo(f"{f.tenant}  {f.key}  {f.status}  fee {f.fee} {f.currency}"
                       + (f"  not booked: {f.unbooked}" if f.unbooked else ""))
    if found.open or found.awaiting_payment or found.rejected or found.unbooked_fees:
        raise typer.Exit(1)


async def reconcile_usage(settings: Settings, now: datetime, tenant: str | None, since: datetime | None,
                          until: datetime | None, grace: timedelta) -> Report:
    """Opens the three stores (read only in effect: nothing is written), reconciles tenant by tenant."""
    from billing_ingest import reconcile as ingest
    from billing_ledger import reconcile as ledger
    from billing_rating import reconcile as rating

    start = ingest.window_start(now, timedelta(days=settings.dedup_window_days))
    end = until or now + timedelta(seconds=settings.future_skew_seconds)
    notes = [(f"ingest remembers accepted events for the dedup window ({settings.dedup_window_days} days, "
              f"BILLING_DEDUP_WINDOW_DAYS): events before {start.isoformat()} cannot be reconciled")]
    if since is not None and since < start:
        notes.append(f"--since {since.isoformat()} is before the dedup window: raised to its start")
    first = max(since, start) if since is not None else start
    if end <= first:
        raise ValueError(f"nothing to reconcile: --until {end.isoformat()} is not after {first.isoformat()}")
    report = Report(first, end, now, grace, notes=notes)
    if not settings.database_url:
        missing = [name for name in STORES if not (settings.data_dir / name).exists()]
        if missing:
            raise StoreMissing(f"no {', '.join(missing)} in {settings.data_dir}/ (BILLING_DATA_DIR): has "
                               "`billing run` run there? (or set DATABASE_URL for the real stack)")
    ledger_app = _ledger(settings)
    stores: list[Database] = []
    try:
        ingest_db = await _open("ingest", settings, stores)
        rating_db = await _open("rating", settings, stores)
        names = await ingest.tenants(ingest_db, tenant)
        if tenant is not None and not names:
            report.notes.append(f"ingest knows no tenant {tenant!r} (no account opened, no event remembered)")
        for name in names:
            report.tenants.append(name)
            usage = await asyncio.to_thread(ledger.account_usage, ledger_app, name, first, end)
            async for page in ingest.accepted(ingest_db, name, first, end):
                decisions = await rating.decisions(rating_db, name, [e.event_id for e in page])
                unanswered = [d.command_id for d in decisions.values()
                              if d.command_id is not None and d.command_id not in usage.outcomes]
                if unanswered:  # rejected by the ledger, or not applied (yet): their receipts say which
                    usage.outcomes.update(await asyncio.to_thread(ledger.receipts, ledger_app, unanswered))
                account_for(report, name, page, decisions, usage.outcomes)
            debited = {event_id for debit in usage.debits if not debit.closed for event_id in debit.event_ids}
            check_debits(report, name, usage.debits, await ingest.remembered(ingest_db, name, debited))
    finally:
        ledger_app.close()
        for db in stores:
            await db.close()
    return report


async def _open(service: str, settings: Settings, stores: list[Database]) -> Database:
    """The service's database (added to ``stores``, which the caller closes), its main table checked to be there."""
    from billing_runtime.db import open_database

    db = await open_database(service, settings)
    stores.append(db)
    table = {"ingest": "seen_events", "rating": "rated_events"}[service]
    try:
        await db.fetchval(f"SELECT 1 FROM {table} LIMIT 1")
    except Exception as exc:  # noqa: BLE001 - asyncpg's or sqlite3's "no such table": the service never ran here
        where = settings.schema(service) if settings.database_url else str(settings.data_dir / f"{service}.sqlite")
        raise StoreMissing(f"{service}'s table {table} is not in {where}: has {service} run there? ({exc})") from None
    return db


def _ledger(settings: Settings) -> LedgerApplication:
    from billing_ledger.application import LedgerApplication, persistence_env
    from eventsourcing.persistence import PersistenceError

    env = persistence_env(settings.database_url, str(settings.data_dir), settings.schema("ledger"))
    ledger = LedgerApplication({**env, "CREATE_TABLE": "n"})  # read only: never sets a store up
    try:
        ledger.recorder.max_notification_id()
    except PersistenceError as exc:  # no events table: the ledger never ran on this store
        ledger.close()
        where = settings.schema("ledger") if settings.database_url else env["SQLITE_DBNAME"]
        raise StoreMissing(f"the ledger's event store is not in {where}: has the ledger run there? ({exc})") from None
    return ledger
