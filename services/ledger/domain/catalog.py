"""The catalogue aggregate: meters, plans, credit packages, credit types. Published versions are immutable.

A publish whose content digest equals the current one changes nothing (idempotent apply). A document with no
meter, plan or package is refused (``nothing_to_publish``, shared with rating's authoring checks). Otherwise the
document becomes the next catalogue version, and every plan whose content changed (or is new) gets the
next version number of its code: existing subscriptions keep the version they were sold (grandfathering),
and every version stays in the aggregate's history.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from billing_events import ids
from billing_events.catalog import CatalogDocument, nothing_to_publish
from eventsourcing.domain import Aggregate, event
from pydantic import ValidationError


class Catalog(Aggregate):
    @staticmethod
    def create_id() -> UUID:
        return ids.catalog_id()

    @event("Created")
    def __init__(self) -> None:
        self.catalog_version = 0  # not `version`: that is the aggregate's own event count
        self.digest = ""
        self.document: dict[str, Any] = {}
        self.plan_versions: dict[str, dict[str, dict[str, Any]]] = {}  # code -> str(version) -> content
        # Every digest published, with the version it last became (since session 15): a ``credit.grant`` naming the
        # catalogue it was checked against waits until that one is here (``catalog_commands.await_catalogue``).
        self.published_digests: dict[str, int] = {}

    def publish(self, *, document: dict[str, Any], digest: str, published_by: str) -> bool:
        """Publishes ``document`` as the next version; returns False when it is the current one already."""
        if digest == self.digest:
            return False
        try:
            parsed = CatalogDocument.model_validate(document)
        except ValidationError as exc:
            raise InvalidCatalog(str(exc)) from exc
        # A version replaces the whole catalogue: an empty one is refused here too (since session 12), not only by
        # rating's routes and the CLI, so a raw ``catalog.publish`` command cannot remove every meter and plan.
        refused = nothing_to_publish(parsed)
        if refused:
            raise InvalidCatalog(refused)
        plans = []
        new_versions: dict[str, int] = {}
        for plan in parsed.plans:
            content = plan.content()
            history = self.plan_versions.get(plan.code, {})
            latest = max((int(v) for v in history), default=0)
            if latest and history[str(latest)] == content:
                version = latest
            else:
                version = latest + 1
                new_versions[plan.code] = version
            plans.append({**content, "version": version})
        stored = parsed.model_dump(mode="json", exclude={"packages"})
        stored["packages"] = [p.model_dump(mode="json") for p in parsed.packages]
        stored["plans"] = plans
        self._published(document=stored, digest=digest, version=self.catalog_version + 1,
                        new_plan_versions=new_versions, published_by=published_by)
        return True

    @event("Published")
    def _published(self, document: dict[str, Any], digest: str, version: int, new_plan_versions: dict[str, int],
                   published_by: str) -> None:
        self.document = document
        self.digest = digest
        self.catalog_version = version
        self.published_digests[digest] = version
        for plan in document.get("plans", []):
            if plan["code"] in new_plan_versions:
                content = {k: v for k, v in plan.items() if k != "version"}
                self.plan_versions.setdefault(plan["code"], {})[str(plan["version"])] = content

    def has_published(self, digest: str) -> bool:
        """Whether the catalogue of ``digest`` was published (the current version or an earlier one)."""
        return digest in self.published_digests

    def plan(self, code: str, version: int) -> dict[str, Any] | None:
        content = self.plan_versions.get(code, {}).get(str(version))
        return {**content, "version": version} if content is not None else None


class InvalidCatalog(ValueError):
    pass
