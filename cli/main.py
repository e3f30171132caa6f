"""The ``billing`` command: the one entry point for everything a person runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import typer
from billing_runtime.auth import Role, mint_token
from billing_runtime.eventloop import run_loop
from billing_runtime.logging import configure_logging
from billing_runtime.settings import Settings

app = typer.Typer(help="Event-sourced billing: ingest, rating, ledger, projections.", no_args_is_help=True)
catalog_app = typer.Typer(help="Catalogue authoring.", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")

SERVICES = ("ingest", "rating", "ledger", "projections")
DEMO_CATALOG = Path("examples/demo-catalog.yaml")


def _builders(names: tuple[str, ...]) -> list:  # type: ignore[type-arg]
    # The composition root: the only module that imports several services (only those asked for).
    import importlib

    return [importlib.import_module(f"billing_{name}.app").build for name in names]


def _bus(settings: Settings):  # type: ignore[no-untyped-def]
    from billing_runtime.bus import EmbeddedBus, KafkaBus

    if settings.kafka_bootstrap_servers:
        return KafkaBus(settings.kafka_bootstrap_servers, settings.topic_partitions, settings.batch_records_max,
                        namespace=settings.namespace)
    return EmbeddedBus(settings.data_dir / "bus.sqlite", settings.topic_partitions, settings.batch_records_max)


async def _publish_commands(bus, commands) -> None:  # type: ignore[no-untyped-def]
    from billing_cli.catalog import keyed
    from billing_events import topics
    from billing_runtime.bus import OutMessage

    await bus.publish([
        OutMessage(topics.LEDGER_COMMANDS, key, c.to_json(), (("schema", b"ledger.command/v1"),))
        for key, c in keyed(commands)
    ])


@app.command()
def run(
    catalog: Annotated[Path, typer.Option(help="Catalogue and demo accounts to apply at start")] = DEMO_CATALOG,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000)")] = None,
) -> None:
    """The embedded default: all four services in one process, data under ./var, HTTP on 127.0.0.1:8000."""
    from billing_cli.catalog import commands_for, load_document
    from billing_runtime.runner import Runner

    configure_logging()
    base = Settings.from_env()
    settings = Settings(**{**base.__dict__, "kafka_bootstrap_servers": None, "database_url": None})
    http_port = port or settings.embedded_port

    async def main() -> None:
        bus = _bus(settings)
        runner = Runner(settings, bus, _builders(SERVICES), "billing (embedded)", http_port)
        task = asyncio.create_task(runner.run_forever())
        await runner.started.wait()
        if catalog and catalog.exists():
            await _publish_commands(bus, commands_for(load_document(catalog), "cli:billing-run"))
        service_token = mint_token(settings, role="service", subject="demo-upstream")
        viewer_token = mint_token(settings, role="viewer", tenant="acme", subject="demo-viewer")
        base_url = f"http://{settings.http_host}:{http_port}"
        typer.echo(f"""
billing is running (embedded: data in {settings.data_dir}/, Ctrl-C to stop). Try it:

  export SERVICE_TOKEN={service_token}
  export VIEWER_TOKEN={viewer_token}
  curl -s {base_url}/v1/accounts/acme/balance -H "Authorization: Bearer $VIEWER_TOKEN"
  curl -s -X POST {base_url}/v1/usage -H "Authorization: Bearer $SERVICE_TOKEN" \\
       -H 'Content-Type: application/json' \\
       -d '{{"id": "evt-1", "tenant": "acme", "meter": "api_calls", "quantity": "23", "timestamp": "'$(date -u +%Y-%m-%dT%H:%M:%SZ)'"}}'
  curl -s {base_url}/v1/accounts/acme/balance -H "Authorization: Bearer $VIEWER_TOKEN"
""", err=False)
        await task

    run_loop(main())


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help="ingest | rating | ledger | projections")],
    port: Annotated[int | None, typer.Option(help="HTTP port (defaults 8001-8004)")] = None,
    role: Annotated[str | None, typer.Option(
        help="projections only: all (API here, consumer in a child process; the default) | api | consumer | "
             "inline (both in this process)")] = None,
) -> None:
    """One service against Kafka (KAFKA_BOOTSTRAP_SERVERS) and PostgreSQL (DATABASE_URL)."""
    from billing_runtime.runner import Runner

    if service not in SERVICES:
        raise typer.BadParameter(f"choose one of {', '.join(SERVICES)}")
    if role is not None and service != "projections":
        raise typer.BadParameter("--role applies to projections only")
    configure_logging()
    settings = Settings.from_env()
    if not settings.kafka_bootstrap_servers or not settings.database_url:
        typer.echo("billing serve needs KAFKA_BOOTSTRAP_SERVERS and DATABASE_URL (see `make stack-up`).", err=True)
        raise typer.Exit(2)
    builders = _builders((service,))
    if service == "projections":
        from billing_projections.app import ROLES, builder

        if (role or "all") not in ROLES:
            raise typer.BadParameter(f"--role must be one of {', '.join(ROLES)}")
        builders = [builder(role or "all")]
    runner = Runner(settings, _bus(settings), builders, f"billing {service}",
                    port or settings.service_ports[service])
    run_loop(runner.run_forever())


@app.command()
def token(
    role: Annotated[str, typer.Option(help="admin | finance | viewer | service")],
    tenant: Annotated[str | None, typer.Option(help="Scope the token to one tenant")] = None,
    subject: Annotated[str | None, typer.Option(help="Who the token is for (audit attribution)")] = None,
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds")] = 8 * 3600,
) -> None:
    """Mints a bearer token signed with the configured key (the local development key by default)."""
    try:
        Role(role)
    except ValueError as exc:
        raise typer.BadParameter(f"role must be one of {', '.join(r.value for r in Role)}") from exc
    typer.echo(mint_token(Settings.from_env(), role=role, tenant=tenant, subject=subject, ttl_seconds=ttl))


@catalog_app.command("apply")
def catalog_apply(file: Annotated[Path, typer.Argument(help="Catalogue YAML or JSON")]) -> None:
    """Validates a catalogue file and sends it to the ledger (idempotent: same file, same command ids)."""
    from billing_cli.catalog import CatalogFileError, check_live_meters, commands_for, load_document

    configure_logging()
    settings = Settings.from_env()
    try:
        commands = commands_for(load_document(file), "cli:catalog-apply")
        asyncio.run(check_live_meters(settings, commands))
    except CatalogFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    async def main() -> None:
        bus = _bus(settings)
        await bus.start()
        try:
            await _publish_commands(bus, commands)
        finally:
            await bus.stop()

    asyncio.run(main())
    typer.echo(json.dumps({"commands": [{"kind": c.kind, "id": str(c.command_id)} for c in commands]}))


@app.command()
def openapi(out: Annotated[Path, typer.Option(help="Where to write the OpenAPI document")] = Path(
        "docs/openapi.json")) -> None:
    """Writes the OpenAPI document of every HTTP route (all four services) to docs/."""
    import tempfile

    from billing_runtime.runner import Runner

    async def main() -> dict:  # type: ignore[type-arg]
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(data_dir=Path(tmp))
            runner = Runner(settings, _bus(settings), _builders(SERVICES), "billing", None)
            await runner.start()
            try:
                return runner.app.openapi()
            finally:
                await runner.stop()

    document = asyncio.run(main())
    out.write_text(json.dumps(document, indent=2) + "\n")
    typer.echo(f"wrote {out} ({len(document.get('paths', {}))} paths)")


@app.command()
def asyncapi(out: Annotated[Path, typer.Option(help="Where to write the AsyncAPI document")] = Path(
        "docs/asyncapi.json")) -> None:
    """Writes the AsyncAPI document (topics, message models, consumer groups), generated by FastStream."""
    from billing_runtime.asyncapi import build_specification

    document = build_specification()
    out.write_text(json.dumps(document, indent=2) + "\n")
    typer.echo(f"wrote {out} ({len(document.get('channels', {}))} channels)")


def _register_subcommands() -> None:
    from billing_cli.projections import projections_app

    app.add_typer(projections_app, name="projections")
    from billing_cli.audit import app as audit_app

    app.add_typer(audit_app, name="audit")
    from billing_cli.subscriptions import app as subscription_app

    app.add_typer(subscription_app, name="subscription")
    from billing_cli.workspaces import app as workspace_app

    app.add_typer(workspace_app, name="workspace")
    from billing_cli.reconcile import app as reconcile_app

    app.add_typer(reconcile_app, name="reconcile")
    from billing_cli.payment_methods import app as payment_methods_app

    app.add_typer(payment_methods_app, name="payment-methods")
    from billing_cli.reports import app as reports_app

    app.add_typer(reports_app, name="reports")


def _register_price() -> None:
    from billing_cli.price import price

    app.command("price", help="Prices a quantity with a price spec and prints the exact amount as JSON.")(price)


_register_price()
_register_subcommands()
