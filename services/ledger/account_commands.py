"""Ledger commands of billing accounts: ``account.open``, ``credit.grant`` (``usage.debit``: :mod:`billing_ledger.usage_commands`)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import (
    RATING_CONTEXT,
    MoneyError,
    Unit,
    is_currency_code,
    parse_decimal,
    resolve_unit,
    to_subunits,
)
from billing_events.timeutil import parse_timestamp
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.catalog_commands import await_catalogue
from billing_ledger.domain.account import BillingAccount
from billing_ledger.domain.catalog import Catalog

UNKNOWN_UNIT = "unknown_unit"


def account_of(batch: _Batch, tenant: str | None) -> BillingAccount:
    if not tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    return batch.existing(ids.account_id(tenant), "unknown_account",  # type: ignore[no-any-return]
                          f"tenant {tenant!r} has no billing account")


def _credit_units(batch: _Batch) -> dict[str, Any]:
    """The credit types the published catalogue declares (``credit_units``: code -> {"scale", ...}); none before
    one is published."""
    catalog = batch.get(Catalog.create_id())
    return (catalog.document.get("credit_units") or {}) if isinstance(catalog, Catalog) else {}


def declared_unit(batch: _Batch, account: BillingAccount, unit: str | None) -> str:
    """``unit`` (None: the account's currency) if a wallet may be in it: an ISO 4217 currency (the account refuses
    another than its own, ``UnitMismatch``) or a credit type declared in the catalogue (docs/money.md). Any other
    code (``ZZZ``) is rejected (``unknown_unit``): it made a wallet of a unit nothing prices. The account's own
    currency, the common case (and a hold's), costs one comparison; a credit unit a lookup in the catalogue."""
    if unit is None or unit == account.currency:
        return account.currency
    if unit not in _credit_units(batch) and not is_currency_code(unit):
        raise CommandRejected(UNKNOWN_UNIT, f"unit {unit!r} is neither an ISO 4217 currency nor a credit unit "
                                            "declared in the catalogue")
    return unit


def unit_scale(batch: _Batch, unit: str) -> Unit:
    """``unit`` with its minor scale: ISO 4217's for a currency, the catalogue's ``scale`` for a credit type."""
    try:
        return resolve_unit(unit, {code: int(spec.get("scale", 2)) for code, spec in _credit_units(batch).items()})
    except MoneyError as exc:
        raise CommandRejected(UNKNOWN_UNIT, str(exc)) from exc


def minor_amount(batch: _Batch, unit: str, field: str, raw: Any, reason: str) -> int:
    """A non-negative decimal amount of ``unit`` in whole minor units of it (ISO 4217: ``50.001`` USD is refused,
    as a checkout quote refuses it; ``5.005`` KWD is taken: a threshold is compared, never charged; an auto-top-up's
    target is also checked against what KWD is charged in, ``auto_top_up.set``), as sub-units; a malformed or finer
    one is rejected with ``reason``."""
    try:
        amount = parse_decimal(raw, field=field)
    except MoneyError as exc:
        raise CommandRejected(reason, str(exc)) from exc
    scale = unit_scale(batch, unit)
    # The unit's own minor digits (ISO 4217): a threshold is compared, never charged, so 5.005 KWD is one.
    if amount.quantize(Decimal(1).scaleb(-scale.minor_scale), context=RATING_CONTEXT) != amount:
        raise CommandRejected(reason, f"{field} {amount} has more decimals than {unit} allows "
                                      f"({scale.minor_scale})")
    return to_subunits(amount)


@handles("account.open")
def _open_account(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    payload = command.payload
    tenant = command.tenant or payload.get("tenant")
    if not tenant:
        raise CommandRejected("missing_tenant")
    if batch.get(ids.account_id(tenant)) is not None:
        raise CommandRejected("account_exists", f"tenant {tenant!r} already has a billing account")
    threshold = payload.get("low_balance_threshold")
    try:
        account = BillingAccount.open(
            tenant, payload["currency"],
            low_balance_threshold=to_subunits(parse_decimal(threshold)) if threshold is not None else None,
            opened_by=command.issued_by)
    except (ValueError, KeyError) as exc:
        raise CommandRejected("invalid_account", str(exc)) from exc
    batch.add(account)


@handles("credit.grant")
def _grant_credit(app: LedgerApplication, batch: _Batch, command: LedgerCommand) -> None:
    account = account_of(batch, command.tenant)
    payload = command.payload
    priority = payload.get("priority", 0)
    if type(priority) is not int:  # int("3") or int(2.5) would have ranked it silently
        raise CommandRejected("invalid_grant", f"priority must be a whole number, not {priority!r}")
    if payload.get("catalog_digest") is not None:
        # Checked against a catalogue that may not be published yet (its command is on another partition): the grant
        # waits for it, then is decided on the catalogue as it is (``catalog_commands.await_catalogue``).
        await_catalogue(app, batch, command, payload["catalog_digest"], "invalid_grant")
    if isinstance(payload.get("unit"), str):
        # As an adjustment's or a hold's: a code neither ISO 4217 nor declared in the catalogue (``ZZZ``) made a
        # wallet nothing prices (``unknown_unit``). Another currency than the account's: ``UnitMismatch`` below.
        declared_unit(batch, account, payload["unit"])
    try:
        expires = payload.get("expires_at")
        account.grant_credit(
            grant_id=ids.grant_id(account.tenant, payload["grant_key"]),
            unit=payload["unit"],
            amount=to_subunits(parse_decimal(payload["amount"], field="amount")),
            priority=priority,
            effective_at=parse_timestamp(payload.get("effective_at") or command.issued_at),
            expires_at=parse_timestamp(expires) if expires else None,
            scope=payload.get("scope"),
            source=payload.get("source", "manual"),
            cause=dict(payload.get("cause") or {}, command_id=str(command.command_id)),
            granted_by=command.issued_by,
        )
    except (ValueError, KeyError) as exc:
        raise CommandRejected("invalid_grant", str(exc)) from exc
