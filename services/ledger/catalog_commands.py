"""Ledger commands of the catalogue (meters, prices, plans, packages): kinds ``catalog.*``."""

from __future__ import annotations

from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.catalog import Catalog, InvalidCatalog


@handles("catalog.publish")
def publish_catalog(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    catalog = batch.get(Catalog.create_id())
    if catalog is None:
        catalog = Catalog()
        batch.add(catalog)
    try:
        catalog.publish(document=command.payload["document"], digest=command.payload["digest"],
                        published_by=command.issued_by)
    except (InvalidCatalog, KeyError) as exc:
        raise CommandRejected("invalid_catalog", str(exc)) from exc
