"""`billing subscription ...`: subscription changes sent to the ledger as commands (like `catalog apply`).

The admin HTTP API (`/v1/accounts/{tenant}/subscriptions...`) answers synchronously; these commands go
through `billing.ledger.commands` and are applied exactly once (an explicit `--id` makes a retry the same
command). Read the outcome with `GET /v1/accounts/{tenant}/subscriptions`.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from enum import Enum
from typing import Annotated, Any

import typer
from billing_events import ids, topics
from billing_events.messages import LedgerCommand
from billing_events.timeutil import utcnow
from billing_runtime.settings import Settings

app = typer.Typer(help="Subscriptions (sent to the ledger as commands).", no_args_is_help=True)


def send_command(kind: str, tenant: str, payload: dict[str, Any], command_id: str | None) -> None:
    from billing_cli.main import _bus
    from billing_runtime.bus import OutMessage

    command = LedgerCommand(command_id=uuid.UUID(command_id) if command_id else uuid.uuid4(), kind=kind, tenant=tenant,
                            issued_at=utcnow(), issued_by="cli:billing-subscription", payload=payload)

    async def main() -> None:
        bus = _bus(Settings.from_env())
        await bus.start()
        try:
            await bus.publish([OutMessage(topics.LEDGER_COMMANDS, str(ids.account_id(tenant)), command.to_json(),
                                          (("schema", b"ledger.command/v1"),))])
        finally:
            await bus.stop()

    asyncio.run(main())
    typer.echo(json.dumps({"command_id": str(command.command_id), "kind": kind, "tenant": tenant}))


Tenant = Annotated[str, typer.Option(help="Billing account (tenant)")]
Key = Annotated[str, typer.Option(help="The subscription's key within the account")]


class Collection(str, Enum):
    INVOICE = "invoice"
    CHARGE_BEFORE_ACCESS = "charge_before_access"

def _command_id(value: str | None) -> str | None:
    """A malformed ``--id`` is a usage error (exit 2) before anything is sent, not a traceback."""
    if value is not None:
        try:
            uuid.UUID(value)
        except ValueError:
            raise typer.BadParameter(f"{value!r} is not a UUID (e.g. {uuid.uuid4()})") from None
    return value


CommandId = Annotated[str | None, typer.Option("--id", help="Command id (uuid) to make a retry idempotent",
                                               callback=_command_id)]


@app.command()
def create(tenant: Tenant, key: Key, plan: Annotated[str, typer.Option(help="Plan code")],
           plan_version: Annotated[int | None, typer.Option(help="Default: the current version")] = None,
           quantity: int = 1, trial: Annotated[bool, typer.Option(help="Trial when eligible")] = True,
           time_zone: str = "UTC",
           collection: Annotated[Collection | None, typer.Option(
               help="invoice (access at once) or charge_before_access (incomplete until the first invoice is "
                    "paid); default: the plan's, else invoice")] = None,
           command_id: CommandId = None) -> None:
    """Subscribes an account to a published plan version."""
    payload: dict[str, Any] = {"key": key, "plan": plan, "quantity": quantity, "trial": trial, "time_zone": time_zone}
    if plan_version is not None:
        payload["plan_version"] = plan_version
    if collection is not None:
        payload["collection"] = collection.value
    send_command("subscription.create", tenant, payload, command_id)


@app.command()
def change(tenant: Tenant, key: Key, plan: str | None = None, plan_version: int | None = None,
           quantity: int | None = None, command_id: CommandId = None) -> None:
    """Changes quantity and/or plan (prorated; see the invoice-preview route first)."""
    payload: dict[str, Any] = {"key": key}
    for name, value in (("plan", plan), ("plan_version", plan_version), ("quantity", quantity)):
        if value is not None:
            payload[name] = value
    send_command("subscription.change", tenant, payload, command_id)


@app.command()
def cancel(tenant: Tenant, key: Key, immediately: bool = False, command_id: CommandId = None) -> None:
    """Cancels at period end, or immediately with a prorated credit note."""
    send_command("subscription.cancel", tenant, {"key": key, "immediately": immediately}, command_id)


@app.command()
def pause(tenant: Tenant, key: Key, command_id: CommandId = None) -> None:
    """Pauses billing from the next period (the period already paid runs to its end)."""
    send_command("subscription.pause", tenant, {"key": key}, command_id)


@app.command()
def resume(tenant: Tenant, key: Key, command_id: CommandId = None) -> None:
    """Resumes a paused subscription (the rest of an unbilled period is billed at once, prorated)."""
    send_command("subscription.resume", tenant, {"key": key}, command_id)
