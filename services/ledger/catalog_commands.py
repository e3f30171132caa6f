"""Ledger commands of the catalogue (meters, prices, plans, packages): kinds ``catalog.*``; and the wait of a command
for the catalogue it was checked against (``await_catalogue``).

The catalogue's command travels under the catalogue's key, a grant under its account's: on different partitions,
applied in any order, possibly by different processes. A ``credit.grant`` in a credit unit a catalogue publishes
may therefore come before that catalogue (``unknown_unit``, before session 15). A grant that names the catalogue it
was checked against (``catalog_digest``: the CLI's grants name their file's catalogue, ``POST /v1/catalog`` answers
the digest) waits for it: while the ledger has not published it, and its publish command has no receipt either, the
grant's batch fails (``CatalogueNotYetPublished``, not a rejection) and the consumer hands it again later while its
other partitions go on (``billing_runtime.bus``), so the catalogue's command is applied meanwhile. Then the grant is
decided on the catalogue as it is (that one or a later version). A catalogue the ledger rejected, or one not published
``CATALOG_WAIT_SECONDS`` after this process first tried the grant, rejects it (``unknown_catalog``).
"""

from __future__ import annotations

import re

from billing_events import ids
from billing_events.catalog import too_large_to_publish
from billing_events.messages import LedgerCommand
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.catalog import Catalog, InvalidCatalog
from billing_ledger.domain.receipt import CommandReceipt
from billing_ledger.limits import CATALOG_WAIT_SECONDS

UNKNOWN_CATALOG = "unknown_catalog"
# A catalogue's digest: SHA-256 of its published document, as rating's route and the CLI compute it (lower-case hex).
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class CatalogueNotYetPublished(Exception):
    """Not a rejection: the batch fails and the consumer hands it again later, until the catalogue is published."""


def published_catalog(batch: _Batch) -> Catalog:
    """The catalogue, or the command is rejected: nothing can be priced or sold before one is published."""
    return batch.existing(Catalog.create_id(), "no_catalog",  # type: ignore[no-any-return]
                          "no catalogue has been published")


def await_catalogue(app: LedgerApplication, batch: _Batch, command: LedgerCommand, digest: object,
                    invalid: str) -> None:
    """Returns once the catalogue of ``digest`` is published (see the module doc); raises
    ``CatalogueNotYetPublished`` while it may still come, ``CommandRejected`` (``invalid`` for a malformed digest,
    ``unknown_catalog``) when it will not."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise CommandRejected(invalid, f"catalog_digest must be a catalogue's SHA-256 digest (64 lower-case hex "
                                       f"digits), not {digest!r}")
    catalog = batch.get(Catalog.create_id())
    if isinstance(catalog, Catalog) and catalog.has_published(digest):
        return
    # The publish command rating's route and the CLI send for it (its id derives from the digest): once it has a
    # receipt and the catalogue is still not published, the ledger rejected it and it never will be.
    receipt = batch.get(ids.command_id("catalog.publish", digest))
    if isinstance(receipt, CommandReceipt):
        raise CommandRejected(UNKNOWN_CATALOG, f"the catalogue this command was checked against ({digest}) was "
                                               f"not published: the ledger rejected it ({receipt.reason})")
    waited = app.waited_seconds(command.command_id)
    if waited < CATALOG_WAIT_SECONDS:
        raise CatalogueNotYetPublished(f"{command.kind} {command.command_id} waits for catalogue {digest} "
                                       f"({waited:.1f} s so far)")
    raise CommandRejected(UNKNOWN_CATALOG, f"the catalogue this command was checked against ({digest}) was not "
                                           f"published within {CATALOG_WAIT_SECONDS} s")


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
