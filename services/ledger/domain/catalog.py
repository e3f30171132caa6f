"""The catalogue aggregate: meters, prices, credit types. Published versions are immutable.

A publish with the same content digest as the current version changes nothing (idempotent apply); any
other content becomes the next version, and earlier versions stay readable from the event history.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from billing_events import ids
from eventsourcing.domain import Aggregate, event


class Catalog(Aggregate):
    @staticmethod
    def create_id() -> UUID:
        return ids.catalog_id()

    @event("Created")
    def __init__(self) -> None:
        self.catalog_version = 0  # not `version`: that is the aggregate's own event count
        self.digest = ""
        self.document: dict[str, Any] = {}

    def publish(self, *, document: dict[str, Any], digest: str, published_by: str) -> bool:
        """Publishes ``document`` as the next version; returns False when it is the current one already."""
        if digest == self.digest:
            return False
        if not isinstance(document.get("meters"), list):
            raise InvalidCatalog("a catalogue needs a list of meters")
        self._published(document=document, digest=digest, version=self.catalog_version + 1, published_by=published_by)
        return True

    @event("Published")
    def _published(self, document: dict[str, Any], digest: str, version: int, published_by: str) -> None:
        self.document = document
        self.digest = digest
        self.catalog_version = version


class InvalidCatalog(ValueError):
    pass
