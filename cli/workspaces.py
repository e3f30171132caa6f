"""`billing workspace ...`: workspace membership sent to the ledger as commands (like `billing subscription`).

A trial needs the account's workspace to have exactly one billing account (seed 004): an account is a member once
it is added here (or over HTTP, `PUT /v1/workspaces/{workspace}/accounts/{tenant}`), or names the workspace when it
subscribes. Read the membership with `GET /v1/workspaces/{workspace}`.
"""

from __future__ import annotations

from typing import Annotated

import typer
from billing_cli.subscriptions import CommandId, Tenant, send_command

app = typer.Typer(help="Workspaces (sent to the ledger as commands).", no_args_is_help=True)


@app.command("add-account")
def add_account(workspace: Annotated[str, typer.Option(help="The workspace (organisation)")], tenant: Tenant,
                command_id: CommandId = None) -> None:
    """Makes a billing account a member of a workspace (an account belongs to one workspace)."""
    send_command("workspace.add_account", tenant, {"workspace": workspace}, command_id)
