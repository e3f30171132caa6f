"""Turns a catalogue file (YAML/JSON) into ledger commands with deterministic ids.

The file has two sections: ``catalog`` (meters, prices, credit units: published as one immutable
version) and ``accounts`` (billing accounts to open, with their initial credit grants). Applying the same
file twice issues the same command ids, which the ledger refuses the second time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import MoneyError, currency, parse_decimal
from billing_events.timeutil import utcnow
from billing_rating.charge_models import PriceSpecError, parse_spec

AGGREGATIONS = ("sum", "count", "max", "last", "unique_count")


class CatalogFileError(ValueError):
    pass


def load_document(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogFileError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CatalogFileError(f"{path}: expected a mapping with 'catalog' and/or 'accounts'")
    return _stringify_numbers(data)


def _stringify_numbers(value: Any) -> Any:
    """YAML numbers become strings before any money code sees them (never a binary float)."""
    if isinstance(value, dict):
        return {k: _stringify_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_stringify_numbers(v) for v in value]
    if isinstance(value, float):
        raise CatalogFileError(f"write decimal amounts as quoted strings, e.g. \"{value}\" (binary floats are "
                               "refused in money paths)")
    return value


def validate_catalog(catalog: dict[str, Any]) -> None:
    credit_units = catalog.get("credit_units") or {}
    scales = {code: int((spec or {}).get("scale", 2)) for code, spec in credit_units.items()}
    codes: set[str] = set()
    for index, meter in enumerate(catalog.get("meters") or []):
        where = f"meters[{index}]"
        code = meter.get("code")
        if not code:
            raise CatalogFileError(f"{where}: a meter needs a code")
        if code in codes:
            raise CatalogFileError(f"{where}: duplicate meter code {code!r}")
        codes.add(code)
        if meter.get("aggregation", "sum") not in AGGREGATIONS:
            raise CatalogFileError(f"{where}: aggregation must be one of {', '.join(AGGREGATIONS)}")
        if meter.get("overage_policy", "overage") not in ("overage", "block"):
            raise CatalogFileError(f"{where}: overage_policy must be overage or block")
        if "price" in meter:
            try:
                parse_spec(meter["price"], credit_scales=scales)
            except PriceSpecError as exc:
                raise CatalogFileError(f"{where}.price: {exc}") from exc


def commands_for(document: dict[str, Any], issued_by: str) -> list[LedgerCommand]:
    now = utcnow()
    commands: list[LedgerCommand] = []
    catalog = document.get("catalog")
    if catalog:
        validate_catalog(catalog)
        digest = hashlib.sha256(json.dumps(catalog, sort_keys=True).encode()).hexdigest()
        commands.append(LedgerCommand(command_id=ids.command_id("catalog.publish", digest), kind="catalog.publish",
                                      issued_at=now, issued_by=issued_by,
                                      payload={"document": catalog, "digest": digest}))
    for index, account in enumerate(document.get("accounts") or []):
        tenant = account.get("tenant")
        try:
            currency(account.get("currency", ""))
        except MoneyError as exc:
            raise CatalogFileError(f"accounts[{index}]: {exc}") from exc
        commands.append(LedgerCommand(
            command_id=ids.command_id("account.open", tenant), kind="account.open", tenant=tenant,
            issued_at=now, issued_by=issued_by,
            payload={k: v for k, v in account.items() if k != "grants"}))
        for grant in account.get("grants") or []:
            try:
                parse_decimal(grant.get("amount"), field="amount")
            except MoneyError as exc:
                raise CatalogFileError(f"accounts[{index}].grants: {exc}") from exc
            commands.append(LedgerCommand(
                command_id=ids.command_id("credit.grant", tenant, grant["key"]), kind="credit.grant",
                tenant=tenant, issued_at=now, issued_by=issued_by,
                payload={"grant_key": grant["key"], **{k: v for k, v in grant.items() if k != "key"}}))
    return commands
