"""Read model: what the catalogue says about units and meters, for display (names, credit unit scales).

Only the latest published version is kept per code; amounts in other read models never depend on it.
"""

from __future__ import annotations

from typing import Any

from billing_projections.facts import Fact
from billing_projections.writer import BatchWriter, Handler, Table, value
from billing_runtime.db import Database

CATALOG_UNITS = Table("catalog_units", {"code": "TEXT"}, {
    "scale": value("INTEGER NOT NULL"), "catalog_version": value("BIGINT NOT NULL"),
})
CATALOG_METERS = Table("catalog_meters", {"code": "TEXT"}, {
    "name": value("TEXT"), "unit_of_measure": value("TEXT"), "aggregation": value("TEXT"),
    "catalog_version": value("BIGINT NOT NULL"),
})
TABLES = (CATALOG_UNITS, CATALOG_METERS)
CREDIT_SCALE_DEFAULT = 2


def handler_for(event_type: str) -> Handler | None:
    return project if event_type == "Catalog.Published" else None


def project(fact: Fact, w: BatchWriter) -> None:
    if fact.type != "Catalog.Published":
        return
    document = fact.data.get("document") or {}
    version = int(fact.data.get("version") or 0)
    for code, spec in sorted((document.get("credit_units") or {}).items()):
        scale = (spec or {}).get("scale", CREDIT_SCALE_DEFAULT) if isinstance(spec, dict) else CREDIT_SCALE_DEFAULT
        w.upsert(CATALOG_UNITS, (str(code),), set={"scale": int(scale), "catalog_version": version})
    for meter in document.get("meters") or []:
        if isinstance(meter, dict) and meter.get("code"):
            w.upsert(CATALOG_METERS, (str(meter["code"]),), set={
                "name": meter.get("name"), "unit_of_measure": meter.get("unit_of_measure"),
                "aggregation": meter.get("aggregation"), "catalog_version": version})


async def credit_scales(db: Database) -> dict[str, int]:
    return {r["code"]: int(r["scale"]) for r in await db.fetch("SELECT code, scale FROM catalog_units")}


async def meters(db: Database) -> dict[str, dict[str, Any]]:
    rows = await db.fetch("SELECT code, name, unit_of_measure, aggregation FROM catalog_meters ORDER BY code")
    return {r["code"]: r for r in rows}
