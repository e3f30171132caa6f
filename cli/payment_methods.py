"""``billing payment-methods backfill``: fills in saved payment methods from their gateways
(``billing_ledger.card_backfill``).

Methods saved before session 13 have no card details (brand, last four digits, expiry): no expiry notice is ever
recorded for them, and an expired default is charged before the backups. This asks each method's gateway (the ones
enabled by ``BILLING_<GATEWAY>_*`` as for ``billing serve ledger``) and sends a ``payment_method.card_update`` command per
card found on ``billing.ledger.commands`` (deterministic ids: running it again changes nothing); the ledger records it
as it records Stripe's card-updated webhooks. It also marks every method the tenant's at its gateway (Stripe's
``metadata.tenant``), so those webhooks reach the ledger for methods saved before session 14, and every account's
gateway customer (since session 15), so Stripe's events about the customer do too. It reads the ledger's
store (``DATABASE_URL``'s schema, or ``billing run``'s files under ``BILLING_DATA_DIR``) and never writes to it.
``--dry-run`` asks the gateways and prints what would be sent, marking and sending nothing.

Exit status 0: every method checked and customer marked; 1: some could not be (its gateway does not know it, could
not answer or is not enabled here; listed); 2: the ledger's store is missing.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Annotated

import typer
from billing_runtime.settings import Settings

if TYPE_CHECKING:
    from billing_events.messages import LedgerCommand

app = typer.Typer(help="Saved payment methods: card details and gateway marks (methods and customers) filled in from "
                       "the gateways.",
                  no_args_is_help=True)
FORMATS = ("table", "json")


@app.command("backfill")
def backfill(
    tenant: Annotated[list[str] | None, typer.Option(help="Only this tenant (repeat for several; default: every "
                                                          "account with saved methods)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Ask the gateways, mark and send nothing")] = False,
    output: Annotated[str, typer.Option("--format", help="table (readable) | json (one document)")] = "table",
) -> None:
    """Records the card details the ledger lacks of saved payment methods, as their gateways tell them, and marks the
    methods and the accounts' gateway customers the tenant's there."""
    from billing_cli.reconcile import StoreMissing, _ledger
    from billing_ledger.card_backfill import backfill as run_backfill
    from billing_ledger.gateways.registry import enabled_gateways

    if output not in FORMATS:
        raise typer.BadParameter(f"--format must be one of {', '.join(FORMATS)}")
    settings = Settings.from_env()
    try:
        ledger = _ledger(settings)
    except StoreMissing as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        result = asyncio.run(run_backfill(ledger, enabled_gateways(settings), tenants=tenant or None,
                                          attribute=not dry_run))
    finally:
        ledger.close()
    if result.commands and not dry_run:
        asyncio.run(_send(settings, result.commands))
    if output == "json":
        typer.echo(json.dumps({"methods": [m.to_json() for m in result.methods],
                               "customers": [c.to_json() for c in result.customers],
                               "commands": [str(c.command_id) for c in result.commands], "sent": not dry_run},
                              indent=2))
    else:
        found = sum(1 for m in result.methods if m.card is not None and m.outcome == "card")
        typer.echo(f"{len(result.methods)} saved method(s), {found} card(s) to record"
                   + (" (dry run: nothing sent)" if dry_run else f", {len(result.commands)} command(s) sent"))
        for m in result.methods:
            card = f"  {m.card['brand']} {m.card['last4']} {m.card['exp_month']:02d}/{m.card['exp_year']}" \
                if m.card else ""
            typer.echo(f"{m.tenant}  {m.method_id}  {m.gateway}  {m.outcome}{card}"
                       + ("  marked" if m.attributed else "") + (f"  ({m.detail})" if m.detail else ""))
        for c in result.customers:
            typer.echo(f"{c.tenant}  customer {c.customer}  {c.gateway}  {c.outcome}"
                       + (f"  ({c.detail})" if c.detail else ""))
    if not result.ok:
        raise typer.Exit(1)


async def _send(settings: Settings, commands: list[LedgerCommand]) -> None:
    from billing_cli.main import _bus
    from billing_events import ids, topics
    from billing_runtime.bus import OutMessage

    bus = _bus(settings)
    await bus.start()
    try:
        await bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(c.tenant)), c.to_json(),
                                      (("schema", b"ledger.command/v1"),)) for c in commands])
    finally:
        await bus.stop()
