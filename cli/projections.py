"""``billing projections ...``: operations on the read models (registered in cli/main.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from billing_runtime.logging import configure_logging
from billing_runtime.settings import Settings

projections_app = typer.Typer(help="Read models: rebuild from billing.ledger.events.", no_args_is_help=True)


@projections_app.callback()
def projections() -> None:
    """Read models of the projections service."""  # a callback keeps `rebuild` a sub-command


@projections_app.command("rebuild")
def rebuild(
    schema: Annotated[str | None, typer.Option(
        help="PostgreSQL schema to rebuild into (default: the live one; stop `billing serve projections` first)")
    ] = None,
    sqlite: Annotated[Path | None, typer.Option(
        help="Embedded mode: SQLite file to rebuild into (default: <BILLING_DATA_DIR>/projections.sqlite)")] = None,
    batch: Annotated[int, typer.Option(min=1, max=100_000, help="Records per replay transaction")] = 5_000,
    workers: Annotated[int | None, typer.Option(
        min=1, max=16, help="Replay processes on PostgreSQL, each a share of the partitions (default: one per CPU)")
    ] = None,
) -> None:
    """Drops the projection tables and replays billing.ledger.events from the beginning to its current end."""
    from billing_projections.rebuild import rebuild as run_rebuild
    from billing_projections.tuning import tune_gc

    configure_logging()
    tune_gc()
    report = asyncio.run(run_rebuild(Settings.from_env(), schema=schema, sqlite_path=sqlite, batch_records_max=batch,
                                     workers=workers))
    typer.echo(report.to_json())


if __name__ == "__main__":
    projections_app()
