"""Ledger commands of billing accounts: ``account.open``, ``credit.grant`` (``usage.debit``: :mod:`billing_ledger.usage_commands`)."""

from __future__ import annotations

from billing_events import ids
from billing_events.messages import LedgerCommand
from billing_events.money import parse_decimal, to_subunits
from billing_events.timeutil import parse_timestamp
from billing_ledger.application import CommandRejected, LedgerApplication, _Batch, handles
from billing_ledger.domain.account import BillingAccount


def account_of(batch: _Batch, tenant: str | None) -> BillingAccount:
    if not tenant:
        raise CommandRejected("missing_tenant", "the command names no tenant")
    return batch.existing(ids.account_id(tenant), "unknown_account",  # type: ignore[no-any-return]
                          f"tenant {tenant!r} has no billing account")


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
