"""Ledger commands of the catalogue (meters, prices, plans, packages): kinds ``catalog.*``."""

from __future__ import annotations

from billing_events.catalog import too_large_to_publish
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.catalog import Catalog, InvalidCatalog


def published_catalog(batch: _Batch) -> Catalog:
    """The catalogue, or the command is rejected: nothing can be priced or sold before one is published."""
    return batch.existing(Catalog.create_id(), "no_catalog",  # type: ignore[no-any-return]
                          "no catalogue has been published")


@handles("catalog.publish")
def publish_catalog(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    document = command.payload.get("document")
    # A command sent past rating's route and the CLI (which refuse it first): its event would not fit in a Kafka
    # record, and the relay, which publishes every event in order, would stop at it.
    too_large = too_large_to_publish(document) if isinstance(document, dict) else None
    if too_large:
        raise CommandRejected("catalog_too_large", too_large)
    catalog = batch.get_or_create(Catalog.create_id(), Catalog)
    try:
        catalog.publish(document=command.payload["document"], digest=command.payload["digest"],
                        published_by=command.issued_by)
    except (InvalidCatalog, KeyError) as exc:
        raise CommandRejected("invalid_catalog", str(exc)) from exc
