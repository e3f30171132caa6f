"""Turns a catalogue file (YAML/JSON) into ledger commands with deterministic ids.

The file has two sections: ``catalog`` (meters, prices, credit units: published as one immutable
version) and ``accounts`` (billing accounts to open, with their initial credit grants). Applying the same
file twice issues the same command ids, which the ledger refuses the second time.

A grant is in the account's currency or a credit unit the catalogue declares (the ledger refuses another,
``unknown_unit``): checked here against the file's catalogue when it has one. The ledger applies commands of different
keys (partitions) in any order, so a grant in a credit unit names the file's catalogue (``catalog_digest``) and the
ledger applies it once that catalogue is published (``billing_ledger.catalog_commands.await_catalogue``). Until session
15 the catalogue's publish command was sent again under the key of each account granted a credit unit instead: a copy
of the whole catalogue per account, and no help to a grant sent apart from its catalogue.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from billing_events import ids
from billing_events.catalog import STORED, CatalogDocument, too_large_to_publish
from billing_events.messages import TENANT_PATTERN, LedgerCommand
from billing_events.money import MoneyError, currency, is_currency_code, parse_decimal
from billing_events.timeutil import utcnow
from billing_rating.catalog_view import CatalogError, check_meters_kept, validate_document
from billing_rating.http import publish_command
from billing_rating.subscriptions import meters_of_live_plans
from billing_runtime.settings import Settings

_TENANT = re.compile(TENANT_PATTERN)


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


def commands_for(document: dict[str, Any], issued_by: str) -> list[LedgerCommand]:
    now = utcnow()
    commands: list[LedgerCommand] = []
    catalog = document.get("catalog")
    declared: set[str] | None = None  # the credit units of the file's catalogue (None: no catalogue in the file)
    digest: str | None = None  # the file's catalogue, which its grants in a credit unit wait for
    if catalog:
        try:
            parsed = validate_document(catalog)
        except CatalogError as exc:
            raise CatalogFileError(f"catalog: {exc}") from exc
        published = parsed.model_dump(mode="json")
        too_large = too_large_to_publish(published)
        if too_large:
            raise CatalogFileError(too_large)
        publish = publish_command(published, issued_by)
        commands.append(publish)
        declared, digest = set(parsed.credit_units), str(publish.payload["digest"])
    for index, account in enumerate(_list_of(document, "accounts", "accounts")):
        where = f"accounts[{index}]"
        if not isinstance(account, dict):
            raise CatalogFileError(f"{where}: expected a mapping with 'tenant', 'currency' and 'grants'")
        tenant = account.get("tenant")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise CatalogFileError(f"{where}.tenant: {_missing_or(tenant)}: expected a tenant id (letters, digits, "
                                   "'.', '_' or '-', at most 128)")
        try:
            account_currency = currency(account.get("currency", "")).code
        except MoneyError as exc:
            raise CatalogFileError(f"{where}: {exc}") from exc
        commands.append(LedgerCommand(
            command_id=ids.command_id("account.open", tenant), kind="account.open", tenant=tenant,
            issued_at=now, issued_by=issued_by,
            payload={k: v for k, v in account.items() if k != "grants"}))
        for grant_index, grant in enumerate(_list_of(account, "grants", f"{where}.grants")):
            at = f"{where}.grants[{grant_index}]"
            if not isinstance(grant, dict):
                raise CatalogFileError(f"{at}: expected a mapping with 'key', 'unit' and 'amount'")
            for name in ("key", "unit"):
                if not isinstance(grant.get(name), str) or not grant[name]:
                    raise CatalogFileError(f"{at}.{name}: {_missing_or(grant.get(name))}: expected a non-empty string")
            try:
                parse_decimal(grant.get("amount"), field="amount")
            except MoneyError as exc:
                raise CatalogFileError(f"{at}: {exc}") from exc
            unit = grant["unit"]
            if unit != account_currency and (is_currency_code(unit) or (declared is not None and unit not in declared)):
                raise CatalogFileError(f"{at}.unit: {unit!r} is neither the account's currency ({account_currency}) "
                                       f"nor a credit unit of the catalogue ({', '.join(sorted(declared or ())) or 'none'})")
            waits = {"catalog_digest": digest} if digest is not None and unit != account_currency else {}
            commands.append(LedgerCommand(
                command_id=ids.command_id("credit.grant", tenant, grant["key"]), kind="credit.grant",
                tenant=tenant, issued_at=now, issued_by=issued_by,
                payload={"grant_key": grant["key"], **waits, **{k: v for k, v in grant.items() if k != "key"}}))
    return commands


def keyed(commands: list[LedgerCommand]) -> list[tuple[str, LedgerCommand]]:
    """Each command with the key it is published under: its account's id, the catalogue's id for the catalogue's."""
    return [(str(ids.account_id(c.tenant)) if c.tenant is not None else str(ids.catalog_id()), c) for c in commands]


async def check_live_meters(settings: Settings, commands: list[LedgerCommand]) -> None:
    """As ``POST /v1/catalog``: a catalogue that leaves out a meter the plan of a live subscription charges is
    refused (``CatalogFileError``). Rating's store says which plans are live; a store rating has not set up (no
    file, no table) has no subscription."""
    from billing_runtime.db import open_database

    publish = next((c for c in commands if c.kind == "catalog.publish"), None)
    if publish is None or (not settings.database_url and not (settings.data_dir / "rating.sqlite").exists()):
        return
    db = await open_database("rating", settings)
    try:
        in_use = await meters_of_live_plans(db)
    except Exception:  # noqa: BLE001 - asyncpg's or sqlite3's "no such table": rating never ran on this store
        return
    finally:
        await db.close()
    try:
        check_meters_kept(CatalogDocument.model_validate(publish.payload["document"], context={STORED: True}), in_use)
    except CatalogError as exc:
        raise CatalogFileError(f"catalog: {exc}") from exc


def _list_of(mapping: dict[str, Any], name: str, where: str) -> list[Any]:
    """``mapping[name]`` as a list (absent or empty: none), else a CatalogFileError naming ``where``."""
    value = mapping.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CatalogFileError(f"{where}: expected a list, not {_missing_or(value)}")
    return value


def _missing_or(value: Any) -> str:
    return "missing" if value is None else f"{value!r} ({type(value).__name__})"
