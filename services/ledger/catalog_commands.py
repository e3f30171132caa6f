"""Ledger commands of the catalogue (meters, prices, plans, packages): kinds ``catalog.*``."""

from __future__ import annotations

from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.catalog import Catalog, InvalidCatalog


def published_catalog(batch: _Batch) -> Catalog:
    """The catalogue, or the command is rejected: nothing can be priced or sold before one is published."""
    return batch.existing(Catalog.create_id(), "no_catalog",  # type: ignore[no-any-return]
                          "no catalogue has been published")


@handles("catalog.publish")
def publish_catalog(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    catalog = batch.get_or_create(Catalog.create_id(), Catalog)
    try:
        catalog.publish(document=command.payload["document"], digest=command.payload["digest"],
                        published_by=command.issued_by)
    except (InvalidCatalog, KeyError) as exc:
        raise CommandRejected("invalid_catalog", str(exc)) from exc
